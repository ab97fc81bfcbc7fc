"""The F and S variants of a layer graph that runs as several layers, and the plan the report shows.

Built on AOTAutograd's forward ATen graph of an inference compile, before the pass edits it:

* the **F variant** is the graph with one more input, a buffer its indexer's indices are copied into in place
  (the static buffer ``cross_graph`` publishes: a mutated input, at a fixed address, so CUDA graphs capture it);
* the **S variant** is the graph with one extra input, the F layer's indices, in place of its own;
  what only the indexer needed is then dead and removed.

Both compute exactly what the graph computes, with the indices coming from elsewhere in the S case.
Graphs whose single indexer has no layer index at compile time (``detection`` said "unknown") get these two;
numbered graphs that read or publish across a graph break get one variant (``cross_graph_numbered``).
``compile_layer_graph`` picks the case, compiles, and returns the per-call wrapper.
"""
from __future__ import annotations

import contextvars
import dataclasses
import enum
from collections.abc import Callable, Sequence

import torch
from torch import fx

from ..config import SHARED, IndexCacheConfig
from ..detection.registry import detect
from ..detection.topk import topk_arguments
from ..graph_utils import copy_graph_module, fake_value
from .cross_graph import CrossGraphCallable, ExpectedIndices, NumberedGraphCallable, layer_map, modules_on_stack

#: How far to look for an S layer in a pattern given only by freq/offset.
_PATTERN_HORIZON = 256


class CrossGraphOff(str, enum.Enum):
    """Why a graph does not share across graphs (it computes as before)."""

    TRAINING = "not an inference graph (gradients enabled): every layer computes"
    NOT_ONE_SITE = "the graph holds more than one indexer: it is not one layer's graph"
    SITE_REFUSES = "its indexer's indices cannot be replaced"
    NO_S_LAYER = "the pattern has no S layer with an F layer before it"
    NO_MODEL = "no module on the call stack has numbered layers owning parameters"
    UNBOUND_SHAPE = "the indices' shape uses a size no graph input carries, so it cannot be checked per call"
    INDEXER_STILL_NEEDED = "without its indices the indexer is still needed by the rest of the graph"
    TWO_CONTAINERS = "its indexers' module paths name more than one layer container"


@dataclasses.dataclass(frozen=True)
class CrossGraphPlan:
    """What the backend does for one graph that shares with the model's other graphs at run time.

    Either a graph whose layer is known only at call time (``numbered`` False), or a numbered graph whose
    leading S layers read an earlier graph's indices (``reads``, from ``source``) or whose last F layer
    publishes them for a later graph (``publishes``).
    """

    graph: str  # dynamo's compile id
    active: bool
    off: CrossGraphOff | None = None
    detail: str = ""
    s_nodes_removed: int = 0  # nodes the S variant does not run
    numbered: bool = False
    source: int | None = None
    reads: tuple[int, ...] = ()
    publishes: int | None = None

    def note(self) -> str:
        if self.active and self.numbered:
            parts = []
            if self.reads:
                parts.append(f"layers {', '.join(map(str, self.reads))} read layer {self.source}'s indices published "
                             f"by an earlier graph ({self.s_nodes_removed} nodes not run) when the host check passes, "
                             "else the graph runs as it is")
            if self.publishes is not None:
                parts.append(f"layer {self.publishes} publishes its indices for later graphs")
            return f"cross-graph: graph {self.graph}: " + "; ".join(parts) + "; see fx_indexcache.layer_calls(model)"
        if self.active:
            return (f"cross-graph: graph {self.graph} runs as several layers; per call, its parameters give the layer: "
                    f"F layers publish their indices, S layers read their F layer's ({self.s_nodes_removed} nodes "
                    "not run) when the host check passes, else it computes; see fx_indexcache.layer_calls(model)")
        detail = f" ({self.detail})" if self.detail else ""
        return f"cross-graph sharing off for graph {self.graph}: {self.off.value}{detail}"


@dataclasses.dataclass
class Variants:
    f_graph: fx.GraphModule
    f_inputs: list
    s_graph: fx.GraphModule
    s_inputs: list
    expected: ExpectedIndices


def _has_s_layer(config: IndexCacheConfig) -> bool:
    from .cross_graph_numbered import layer_horizon

    horizon = layer_horizon(config, _PATTERN_HORIZON)
    return any(config.layer_kind(i) == SHARED and config.source_layer(i) is not None for i in range(horizon))


def _size_expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def expected_indices(graph: fx.Graph, site) -> ExpectedIndices | None:
    """The site's indices shape and key width as expressions of graph-input sizes; None if one is bound by
    no input (then nothing can be checked per call)."""
    indices, score = fake_value(site.indices), fake_value(site.anchor.args[0])
    if not isinstance(indices, torch.Tensor) or not isinstance(score, torch.Tensor):
        return None
    _, _, dim, _, _ = topk_arguments(site.anchor)
    sizes = tuple(_size_expr(s) for s in (*indices.shape, score.shape[dim]))
    needed = set().union(*(getattr(s, "free_symbols", set()) for s in sizes))
    bound: dict = {}
    for position, node in enumerate(graph.find_nodes(op="placeholder")):
        value = fake_value(node)
        dims = [(None, value)] if isinstance(value, torch.SymInt) else (
            list(enumerate(value.shape)) if isinstance(value, torch.Tensor) else [])
        for at, size in dims:
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            if expr is not None and expr.is_Symbol and expr in needed:
                bound.setdefault(expr, (expr, position, at))
    if needed - set(bound):
        return None
    sizes = tuple(int(s) if not getattr(s, "free_symbols", None) else s for s in sizes)
    return ExpectedIndices(sizes, tuple(bound.values()), indices.dtype, indices.device)


def _new_input(graph: fx.Graph, name: str, example: torch.Tensor) -> fx.Node:
    """A placeholder after the last one (the callers pass its value last)."""
    with graph.inserting_after(graph.find_nodes(op="placeholder")[-1]):
        node = graph.placeholder(name)
    node.meta["val"] = example
    return node


def example_indices(site) -> torch.Tensor:
    indices = fake_value(site.indices)
    with indices.fake_mode:
        return torch.empty(indices.shape, dtype=indices.dtype, device=indices.device)


def write_indices(module: fx.GraphModule, site) -> fx.GraphModule:
    """``module`` (edited in place) with one more, last input, a buffer it copies ``site``'s indices into: the
    static buffer the wrapper publishes (a mutated input keeps a fixed address under CUDA graphs)."""
    graph = module.graph
    buffer = _new_input(graph, "publish_into", example_indices(site))
    with graph.inserting_before(graph.find_nodes(op="output")[0]):
        graph.call_function(torch.ops.aten.copy_.default, (buffer, site.indices))
    graph.lint()
    module.recompile()
    return module


def with_indices_output(module: fx.GraphModule) -> fx.GraphModule:
    """``module`` (edited in place) with its single indexer's indices as one more, last output (a region body,
    whose outputs stay inside the outer graph)."""
    site = detect(module.graph).sites[0]
    (output,) = module.graph.find_nodes(op="output")
    outs = output.args[0]
    output.args = (type(outs)((*outs, site.indices)),)
    module.recompile()
    return module


def with_indices_input(module: fx.GraphModule, example: torch.Tensor) -> tuple[fx.GraphModule, int] | None:
    """``module`` taking its single indexer's indices as one more, last input, and the nodes that became dead."""
    removed = read_indices(module, detect(module.graph).sites, example)
    return None if removed is None else (module, removed)


def read_indices(module: fx.GraphModule, sites, example: torch.Tensor) -> int | None:
    """Feed ``sites``' consumers from one more, last input (published indices) and drop what became dead, in place;
    the number of nodes removed, or None if an indexer stays needed (then ``module`` is spoilt)."""
    graph = module.graph
    before = len(graph.nodes)
    published = _new_input(graph, "published_indices", example)
    for site in sites:
        site.indices.replace_all_uses_with(published)
    graph.eliminate_dead_code()
    alive = set(graph.nodes)
    if any(site.anchor in alive for site in sites):
        return None
    graph.lint()
    module.recompile()
    return before + 1 - len(graph.nodes)


def plan_variants(module: fx.GraphModule, inputs: Sequence, config: IndexCacheConfig, detection, *, graph: str,
                  inference: bool) -> tuple[CrossGraphPlan | None, Variants | None]:
    """Whether this forward graph (layer unknown at compile time) qualifies, and its variants when it does
    (None, None: not concerned)."""
    if not config.use_index_cache or not detection.sites or detection.unknown_reason is None:
        return None, None

    def off(reason: CrossGraphOff, detail: str = ""):
        return CrossGraphPlan(graph, False, reason, detail), None

    if not inference:
        return off(CrossGraphOff.TRAINING)
    if len(detection.sites) != 1 or detection.unplaced:
        return off(CrossGraphOff.NOT_ONE_SITE, f"{len(detection.sites)} indexers")
    if detection.sites[0].kind != "aten.topk":
        return off(CrossGraphOff.SITE_REFUSES, f"a {detection.sites[0].kind} site; only aten.topk sites are built")
    refusal = detection.sites[0].refusal()
    if refusal is not None:
        return off(CrossGraphOff.SITE_REFUSES, refusal)
    if not _has_s_layer(config):
        return off(CrossGraphOff.NO_S_LAYER)
    expected = expected_indices(module.graph, detection.sites[0])
    if expected is None:
        return off(CrossGraphOff.UNBOUND_SHAPE)
    example = example_indices(detection.sites[0])
    s_graph = copy_graph_module(module)
    removed = read_indices(s_graph, detect(s_graph.graph).sites, example)
    if removed is None:
        return off(CrossGraphOff.INDEXER_STILL_NEEDED)
    f_graph = copy_graph_module(module)
    write_indices(f_graph, detect(f_graph.graph).sites[0])
    return CrossGraphPlan(graph, True, s_nodes_removed=removed), Variants(
        f_graph, [*inputs, example], s_graph, [*inputs, example], expected)


def plan_numbered(module: fx.GraphModule, inputs: Sequence, graph_pass, detection, *, graph: str,
                  inference: bool):
    """A numbered graph's plan and its variant (see ``cross_graph_numbered``); (None, None): not concerned."""
    from . import cross_graph_numbered as numbered

    needs = numbered.numbered_needs(detection, graph_pass.config, _PATTERN_HORIZON)
    if needs is None:
        return None, None
    if not inference:
        return CrossGraphPlan(graph, False, CrossGraphOff.TRAINING, numbered=True), None
    span = numbered.plan_span(module, detection, graph_pass.config, needs)
    if isinstance(span, str):
        return CrossGraphPlan(graph, False, CrossGraphOff.SITE_REFUSES, span, numbered=True), None
    variant = numbered.build_variant(module, inputs, graph_pass, span)
    if variant is None:
        return CrossGraphPlan(graph, False, CrossGraphOff.INDEXER_STILL_NEEDED, numbered=True), None
    plan = CrossGraphPlan(graph, True, s_nodes_removed=variant.nodes_removed, numbered=True, source=span.source,
                          reads=tuple(layer for layer, _ in span.reads),
                          publishes=None if span.publishes is None else span.publishes[0])
    return plan, (span, variant)


def compile_layer_graph(module: fx.GraphModule, inputs: Sequence, graph_pass, *, compile_as_is: Callable,
                        compile_variant: Callable, inference: bool) -> tuple[Callable, CrossGraphPlan | None]:
    """Compile a forward graph as it is, plus, where it shares with other graphs at run time, its variants and
    the per-call wrapper.

    ``compile_as_is(module)`` compiles the graph the usual way (the pass runs there); ``compile_variant(gm,
    inputs, static)`` compiles a variant without the pass, its last ``static`` inputs being index buffers
    at fixed addresses. Both return boxed callables.
    """
    graph = compile_id()
    detection = detect(copy_graph_module(module).graph, graph_pass.graph_starts_at_first_layer)
    plan, variants = plan_variants(module, inputs, graph_pass.config, detection, graph=graph, inference=inference)
    span = None
    if plan is None:
        plan, span = plan_numbered(module, inputs, graph_pass, detection, graph=graph, inference=inference)
    maps = [found for found in map(layer_map, modules_on_stack()) if found.by_storage] if (variants or span) else []
    if (variants or span) and not maps:
        plan, variants, span = CrossGraphPlan(graph, False, CrossGraphOff.NO_MODEL, numbered=bool(span)), None, None
    token = _PENDING.set(plan)
    try:
        as_is = compile_as_is(module)
    finally:
        _PENDING.reset(token)
    if variants is not None:
        f_compiled = compile_variant(variants.f_graph, variants.f_inputs, 1)
        s_compiled = compile_variant(variants.s_graph, variants.s_inputs, 1)
        wrapper = CrossGraphCallable(as_is, f_compiled, s_compiled, variants.expected, graph_pass.config, maps, graph)
        return wrapper, plan
    if span is not None:
        span, variant = span
        compiled = compile_variant(variant.module, variant.inputs, variant.extra_inputs)
        return NumberedGraphCallable(as_is, compiled, span, maps, graph), plan
    return as_is, plan


_PENDING: contextvars.ContextVar[CrossGraphPlan | None] = contextvars.ContextVar("fx_indexcache_plan", default=None)


def pending_plan() -> CrossGraphPlan | None:
    """The plan for the graph being compiled as it is right now (the pass puts it on its report)."""
    return _PENDING.get()


def eager_inference_compiler(rewrite: Callable, graph_pass, rewrite_variant: Callable) -> Callable:
    """AOTAutograd's inference compiler for the eager backend: ``rewrite(module)`` is the usual path,
    ``rewrite_variant(variant)`` a variant's (already shared: the fusion alone)."""
    from functorch.compile import make_boxed_func

    def compile_forward(module: fx.GraphModule, inputs):
        compiled, plan = compile_layer_graph(
            module, inputs, graph_pass, compile_as_is=lambda m: make_boxed_func(rewrite(m)),
            compile_variant=lambda variant, _, __: make_boxed_func(rewrite_variant(variant)), inference=True)
        return compiled

    return compile_forward


def inductor_inner_compile(graph_pass, variant_pass) -> Callable:
    """Inductor's ``inner_compile`` for the IndexCache backend: forward inference graphs go through
    ``compile_layer_graph``; the variants, already shared, are compiled with ``variant_pass`` as the post-grad
    pass (our kernel fusion, then the user's own passes).

    Under CUDA graphs a variant's index buffers are static inputs (``static_input_idxs``): cudagraph trees
    then read and write them in place, at their fixed address, instead of copying them on every replay.
    """
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.utils import BoxedBool

    def compile_variant(variant: fx.GraphModule, inputs, static: int, kwargs, cudagraphs: bool | None):
        from torch._guards import TracingContext

        kwargs = dict(kwargs)
        kwargs["static_input_idxs"] = [*kwargs.get("static_input_idxs", ()), *range(len(inputs) - static, len(inputs))]
        if cudagraphs is not None:  # its own flag: Inductor switches it off per graph that cannot be captured
            kwargs["cudagraphs"] = BoxedBool(cudagraphs)
        context = TracingContext.try_get()
        strides = None if context is None or context.output_strides is None else list(context.output_strides)
        if strides is not None:
            context.output_strides.clear()  # Inductor reports each graph's output strides into an empty list
        with torch._inductor.config.patch(post_grad_custom_post_pass=variant_pass):
            compiled = compile_fx_inner(variant, inputs, **kwargs)
        if strides is not None:  # the graph AOTAutograd asked for is the as-is one: keep its output strides
            context.output_strides[:] = strides
        return compiled

    def inner(module: fx.GraphModule, inputs, **kwargs):
        if not kwargs.get("is_inference", False):
            return compile_fx_inner(module, inputs, **kwargs)
        flag = kwargs.get("cudagraphs")
        cudagraphs = None if flag is None else bool(flag.value)  # before the as-is compile may switch it off
        compiled, plan = compile_layer_graph(
            module, inputs, graph_pass, compile_as_is=lambda m: compile_fx_inner(m, inputs, **kwargs),
            compile_variant=lambda variant, ins, static: compile_variant(variant, ins, static, kwargs, cudagraphs),
            inference=True)
        graph_pass.cross_graph_plan = plan  # for the report of an FX-graph-cache hit, where the pass did not run
        return compiled

    return inner


def compile_id() -> str:
    from torch._guards import CompileContext

    return str(CompileContext.current_compile_id() or "?")
