"""The F and S variants of a layer graph that runs as several layers, and the plan the report shows.

Built on AOTAutograd's forward ATen graph of an inference compile, before the pass edits it:

* the **F variant** is the graph with the indexer's indices appended to its outputs (the wrapper in
  ``cross_graph`` pops them into the model's slot, so the caller sees the graph's own outputs);
* the **S variant** is the graph with one extra input, the F layer's indices, in place of its own;
  what only the indexer needed is then dead and removed.

Both compute exactly what the graph computes, with the indices coming from elsewhere in the S case.
Only graphs whose single indexer has no layer index at compile time qualify (``detection`` said
"unknown"); a graph whose layers are numbered is handled inside the graph by the pass as before.
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
from .cross_graph import CrossGraphCallable, ExpectedIndices, layer_map, modules_on_stack

#: How far to look for an S layer in a pattern given only by freq/offset.
_PATTERN_HORIZON = 256


class CrossGraphOff(str, enum.Enum):
    """Why a layer graph with an unnumbered indexer does not share across graphs (it computes as before)."""

    CUDAGRAPHS = ("CUDA graphs are on (mode='reduce-overhead' / triton.cudagraphs): published indices would have to "
                  "live in static buffers, which is not built; every layer computes")
    TRAINING = "not an inference graph (gradients enabled): every layer computes"
    NOT_ONE_SITE = "the graph holds more than one indexer: it is not one layer's graph"
    SITE_REFUSES = "its indexer's indices cannot be replaced"
    NO_S_LAYER = "the pattern has no S layer with an F layer before it"
    NO_MODEL = "no module on the call stack has numbered layers owning parameters"
    UNBOUND_SHAPE = "the indices' shape uses a size no graph input carries, so it cannot be checked per call"
    INDEXER_STILL_NEEDED = "without its indices the indexer is still needed by the rest of the graph"


@dataclasses.dataclass(frozen=True)
class CrossGraphPlan:
    """What the backend does for one graph whose layer is known only at call time."""

    graph: str  # dynamo's compile id
    active: bool
    off: CrossGraphOff | None = None
    detail: str = ""
    s_nodes_removed: int = 0  # nodes the S variant does not run

    def note(self) -> str:
        if self.active:
            return (f"cross-graph: graph {self.graph} runs as several layers; per call, its parameters give the layer: "
                    f"F layers publish their indices, S layers read their F layer's ({self.s_nodes_removed} nodes "
                    "not run) when the host check passes, else it computes; see fx_indexcache.layer_calls(model)")
        detail = f" ({self.detail})" if self.detail else ""
        return f"cross-graph sharing off for graph {self.graph}: {self.off.value}{detail}"


@dataclasses.dataclass
class Variants:
    f_graph: fx.GraphModule
    s_graph: fx.GraphModule
    s_inputs: list
    expected: ExpectedIndices


def _has_s_layer(config: IndexCacheConfig) -> bool:
    horizon = config.num_layers or len(config.index_topk_pattern or "") or _PATTERN_HORIZON
    return any(config.layer_kind(i) == SHARED and config.source_layer(i) is not None for i in range(horizon))


def _size_expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def _expected(graph: fx.Graph, site) -> ExpectedIndices | None:
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


def with_indices_output(module: fx.GraphModule) -> fx.GraphModule:
    """``module`` (edited in place) with its single indexer's indices as one more, last output."""
    site = detect(module.graph).sites[0]
    (output,) = module.graph.find_nodes(op="output")
    outs = output.args[0]
    output.args = (type(outs)((*outs, site.indices)),)
    module.recompile()
    return module


def with_indices_input(module: fx.GraphModule, example: torch.Tensor) -> tuple[fx.GraphModule, int] | None:
    """``module`` (edited in place) taking its indexer's indices as one more, last input, and the number of
    nodes that became dead; None if the indexer stays needed."""
    graph = module.graph
    site = detect(graph).sites[0]
    before = len(graph.nodes)
    with graph.inserting_after(graph.find_nodes(op="placeholder")[-1]):
        published = graph.placeholder("published_indices")
    published.meta["val"] = example
    site.indices.replace_all_uses_with(published)
    graph.eliminate_dead_code()
    if site.anchor.graph is graph and any(node is site.anchor for node in graph.nodes):
        return None
    graph.lint()
    module.recompile()
    return module, before + 1 - len(graph.nodes)


def plan_variants(module: fx.GraphModule, inputs: Sequence, config: IndexCacheConfig, *, graph: str,
                  cudagraphs: bool, inference: bool) -> tuple[CrossGraphPlan | None, Variants | None]:
    """Whether this forward graph qualifies, and its variants when it does (None, None: not concerned)."""
    if not config.use_index_cache:
        return None, None
    detection = detect(copy_graph_module(module).graph)
    if not detection.sites or detection.unknown_reason is None:
        return None, None

    def off(reason: CrossGraphOff, detail: str = ""):
        return CrossGraphPlan(graph, False, reason, detail), None

    if cudagraphs:
        return off(CrossGraphOff.CUDAGRAPHS)
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
    indices = fake_value(detection.sites[0].indices)
    expected = _expected(module.graph, detection.sites[0])
    if expected is None:
        return off(CrossGraphOff.UNBOUND_SHAPE)
    with indices.fake_mode:
        example = torch.empty(indices.shape, dtype=indices.dtype, device=indices.device)
    s_built = with_indices_input(copy_graph_module(module), example)
    if s_built is None:
        return off(CrossGraphOff.INDEXER_STILL_NEEDED)
    s_graph, removed = s_built
    return CrossGraphPlan(graph, True, s_nodes_removed=removed), Variants(
        with_indices_output(copy_graph_module(module)), s_graph, [*inputs, example], expected)


def compile_layer_graph(module: fx.GraphModule, inputs: Sequence, config: IndexCacheConfig, *,
                        compile_as_is: Callable, compile_variant: Callable, cudagraphs: bool,
                        inference: bool) -> tuple[Callable, CrossGraphPlan | None]:
    """Compile a forward graph: as it is, plus its F and S variants and the per-call wrapper where it qualifies.

    ``compile_as_is(module)`` compiles the graph the usual way (the pass runs there); ``compile_variant(gm,
    inputs)`` compiles a variant without the pass. Both return boxed callables.
    """
    graph = compile_id()
    plan, variants = plan_variants(module, inputs, config, graph=graph, cudagraphs=cudagraphs, inference=inference)
    maps = [found for found in map(layer_map, modules_on_stack()) if found.by_storage] if variants else []
    if variants is not None and not maps:
        plan, variants = CrossGraphPlan(graph, False, CrossGraphOff.NO_MODEL), None
    token = _PENDING.set(plan)
    try:
        as_is = compile_as_is(module)
    finally:
        _PENDING.reset(token)
    if variants is None:
        return as_is, plan
    f_compiled = compile_variant(variants.f_graph, list(inputs))
    s_compiled = compile_variant(variants.s_graph, variants.s_inputs)
    return CrossGraphCallable(as_is, f_compiled, s_compiled, variants.expected, config, maps, graph), plan


_PENDING: contextvars.ContextVar[CrossGraphPlan | None] = contextvars.ContextVar("fx_indexcache_plan", default=None)


def pending_plan() -> CrossGraphPlan | None:
    """The plan for the graph being compiled as it is right now (the pass puts it on its report)."""
    return _PENDING.get()


def eager_inference_compiler(rewrite: Callable, graph_pass) -> Callable:
    """AOTAutograd's inference compiler for the eager backend: ``rewrite(module)`` is the usual path."""
    from functorch.compile import make_boxed_func

    def compile_forward(module: fx.GraphModule, inputs):
        compiled, plan = compile_layer_graph(
            module, inputs, graph_pass.config, compile_as_is=lambda m: make_boxed_func(rewrite(m)),
            compile_variant=lambda variant, _: make_boxed_func(variant.forward), cudagraphs=False, inference=True)
        return compiled

    return compile_forward


def inductor_inner_compile(graph_pass, installed_pass, cudagraphs: bool) -> Callable:
    """Inductor's ``inner_compile`` for the IndexCache backend: forward inference graphs go through
    ``compile_layer_graph``; the variants are compiled with the user's own post-grad passes only."""
    from torch._inductor.compile_fx import compile_fx_inner

    user_passes = [p for p in getattr(installed_pass, "passes", (installed_pass,)) if p is not graph_pass]

    def compile_variant(variant: fx.GraphModule, inputs, kwargs):
        from torch._guards import TracingContext

        context = TracingContext.try_get()
        strides = None if context is None or context.output_strides is None else list(context.output_strides)
        if strides is not None:
            context.output_strides.clear()  # Inductor reports each graph's output strides into an empty list
        chain = installed_pass if not user_passes else type(installed_pass)(*user_passes)
        with torch._inductor.config.patch(post_grad_custom_post_pass=chain if user_passes else None):
            compiled = compile_fx_inner(variant, inputs, **kwargs)
        if strides is not None:  # the graph AOTAutograd asked for is the as-is one: keep its output strides
            context.output_strides[:] = strides
        return compiled

    def inner(module: fx.GraphModule, inputs, **kwargs):
        if not kwargs.get("is_inference", False):
            return compile_fx_inner(module, inputs, **kwargs)
        compiled, plan = compile_layer_graph(
            module, inputs, graph_pass.config, compile_as_is=lambda m: compile_fx_inner(m, inputs, **kwargs),
            compile_variant=lambda variant, ins: compile_variant(variant, ins, kwargs), cudagraphs=cudagraphs,
            inference=True)
        graph_pass.cross_graph_plan = plan  # for the report of an FX-graph-cache hit, where the pass did not run
        return compiled

    return inner


def compile_id() -> str:
    from torch._guards import CompileContext

    return str(CompileContext.current_compile_id() or "?")
