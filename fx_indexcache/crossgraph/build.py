"""The F and S variants of a layer graph that runs as several layers, and the plan the report shows.

Built on AOTAutograd's forward ATen graph of an inference compile, before the pass edits it:

* the **F variant** is the graph with one more input, a buffer its indexer's indices are copied into in place
  (the static buffer ``runtime`` publishes: a mutated input, at a fixed address, so CUDA graphs capture it);
* the **S variant** is the graph with one extra input, the F layer's indices, in place of its own;
  what only the indexer needed is then dead and removed.

Both compute exactly what the graph computes, with the indices coming from elsewhere in the S case.
Graphs whose single indexer has no layer index at compile time (``detection`` said "unknown") get these two;
numbered graphs that read or publish across a graph break get one variant (``numbered``).
``compile_layer_graph`` picks the case, compiles, and returns the per-call wrapper.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx

from ..config import IndexCacheConfig
from ..detection.registry import detect
from ..graph_utils import copy_graph_module
from ..rewrite.indices_io import example_indices, read_indices, write_indices
from . import numbered
from .plan import CrossGraphOff, CrossGraphPlan, Variants, expected_indices, has_s_layer
from .runtime import CrossGraphCallable, NumberedGraphCallable, modules_on_stack


def plan_variants(module: fx.GraphModule, inputs: Sequence, config: IndexCacheConfig, detection, *, graph: str,
                  inference: bool, model_layers: int | None) -> tuple[CrossGraphPlan | None, Variants | None]:
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
    if detection.sites[0].key_axis() is None:
        return off(CrossGraphOff.SITE_REFUSES, f"a {detection.sites[0].kind} site, not a selection from a score "
                   "tensor; only those (aten.topk, a sort cut to k) are built")
    refusal = detection.sites[0].refusal()
    if refusal is not None:
        return off(CrossGraphOff.SITE_REFUSES, refusal)
    if not has_s_layer(config, model_layers):
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
    """A numbered graph's plan and its variant (see ``numbered``); (None, None): not concerned."""
    needs = numbered.numbered_needs(detection, graph_pass.config, graph_pass.model_layers(detection),
                                    graph_pass.context.stage_first_layer)
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
    plan = CrossGraphPlan(graph, True, s_nodes_removed=variant.nodes_removed, numbered=True,
                          reads=tuple(layer for layer, _ in span.reads),
                          publishes=None if span.publishes is None else span.publishes[0])
    return plan, (span, variant)


def compile_layer_graph(module: fx.GraphModule, inputs: Sequence, graph_pass, *, compile_as_is: Callable,
                        compile_variant: Callable, inference: bool) -> tuple[Callable, CrossGraphPlan | None]:
    """Compile a forward graph as it is, plus, where it shares with other graphs at run time, its variants and
    the per-call wrapper.

    ``compile_as_is(module, plan)`` compiles the graph the usual way, the pass running there with ``plan`` for its
    report; ``compile_variant(gm, inputs, static)`` compiles a variant without the pass, its last ``static``
    inputs being index buffers at fixed addresses. Both return boxed callables.
    """
    graph = compile_id()
    detection = graph_pass.detect(copy_graph_module(module).graph)
    plan, variants = plan_variants(module, inputs, graph_pass.config, detection, graph=graph, inference=inference,
                                   model_layers=graph_pass.model_layers(detection))
    span = None
    if plan is None:
        plan, span = plan_numbered(module, inputs, graph_pass, detection, graph=graph, inference=inference)
    session = graph_pass.session
    maps = [found for found in map(session.layer_map, modules_on_stack()) if found.by_storage] if (
        variants or span) else []
    if (variants or span) and not maps:
        plan, variants, span = CrossGraphPlan(graph, False, CrossGraphOff.NO_MODEL, numbered=bool(span)), None, None
    as_is = compile_as_is(module, plan)
    if variants is not None:
        f_compiled = compile_variant(variants.f_graph, variants.f_inputs, 1)
        s_compiled = compile_variant(variants.s_graph, variants.s_inputs, 1)
        wrapper = CrossGraphCallable(as_is, f_compiled, s_compiled, variants.expected, graph_pass.config, maps, graph,
                                     session)
        return wrapper, plan
    if span is not None:
        span, variant = span
        compiled = compile_variant(variant.module, variant.inputs, variant.extra_inputs)
        return NumberedGraphCallable(as_is, compiled, span, maps, graph, session), plan
    return as_is, plan


def eager_inference_compiler(rewrite: Callable, graph_pass, rewrite_variant: Callable,
                             plans: list[CrossGraphPlan | None]) -> Callable:
    """AOTAutograd's inference compiler for the eager backend: ``rewrite(module, plan)`` is the usual path,
    ``rewrite_variant(variant)`` a variant's (already shared: the fusion alone). Each graph's plan is appended
    to ``plans``."""
    from functorch.compile import make_boxed_func

    def compile_forward(module: fx.GraphModule, inputs):
        compiled, plan = compile_layer_graph(
            module, inputs, graph_pass, compile_as_is=lambda m, p: make_boxed_func(rewrite(m, p)),
            compile_variant=lambda variant, _, __: make_boxed_func(rewrite_variant(variant)), inference=True)
        plans.append(plan)
        return compiled

    return compile_forward


def inductor_inner_compile(graph_pass, variant_pass, swap_pass: Callable, plans: list[CrossGraphPlan | None]
                           ) -> Callable:
    """Inductor's ``inner_compile`` for the IndexCache backend: forward inference graphs go through
    ``compile_layer_graph``; the variants, already shared, are compiled with ``variant_pass`` as the post-grad
    pass (our kernel fusion, then the user's own passes). Training graphs (a forward with gradients, a backward)
    are compiled with the pass told so (``swap_pass(graph_pass.for_training())``): it leaves them as they are.

    ``swap_pass(new)`` is a context manager that installs ``new`` in place of ``graph_pass`` in Inductor's
    post-grad pass chain for one compile; each graph's plan is appended to ``plans`` (the report of an FX graph
    cache hit, where the pass did not run, takes it from there).

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

    def compile_as_is(module, inputs, kwargs, plan):
        with swap_pass(graph_pass.with_plan(plan)):
            return compile_fx_inner(module, inputs, **kwargs)

    def inner(module: fx.GraphModule, inputs, **kwargs):
        if not kwargs.get("is_inference", False):
            with swap_pass(graph_pass.for_training()):
                return compile_fx_inner(module, inputs, **kwargs)
        flag = kwargs.get("cudagraphs")
        cudagraphs = None if flag is None else bool(flag.value)  # before the as-is compile may switch it off
        compiled, plan = compile_layer_graph(
            module, inputs, graph_pass, compile_as_is=lambda m, p: compile_as_is(m, inputs, kwargs, p),
            compile_variant=lambda variant, ins, static: compile_variant(variant, ins, static, kwargs, cudagraphs),
            inference=True)
        plans.append(plan)
        return compiled

    return inner


def compile_id() -> str:
    from torch._guards import CompileContext

    return str(CompileContext.current_compile_id() or "?")
