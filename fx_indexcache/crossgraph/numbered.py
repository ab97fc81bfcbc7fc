"""Numbered graphs that share across a graph break: which layers read or publish, and the variant that does it.

A graph break in the model's top frame splits its layers into numbered graphs (layers 0-2 in one, 3-5
in the next; module paths or the first graph's order give the numbers). The pass shares inside each
graph; an S layer whose F layer is in an earlier graph is left computing there. This module finds, for
one such graph before the pass edits it:

* its **leading S layers** (before its first F indexer layer): they read the engines' one buffer, which an
  earlier graph wrote, so they can read indices that graph published;
* its **publishing F layer**: the last F layer, when the layer right after the graph is an S layer, which reads
  the buffer that layer wrote last.

Both follow the engines' one-buffer rule: an S layer reads the last indexer layer that computed, whatever layers
without an indexer (dense, sliding-window) lie between. The graph's span therefore covers the layers its module
paths show without an indexer too, and at run time the read is of the last F layer that ran (``Timeline.writer``),
never of a layer chosen by number.

and builds the one variant the wrapper (``runtime.NumberedGraphCallable``) runs when the host check
passes: the graph with the pass's in-graph sharing applied, the leading S layers fed from one more
input, and the publishing layer's indices copied into one more input (the static buffer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import fx

from ..config import FULL, SHARED, IndexCacheConfig
from ..detection.layers import layer_key
from ..detection.registry import Detection
from ..graph_utils import copy_graph_module
from ..rewrite.indices_io import example_indices, read_indices, write_indices
from .plan import expected_indices, layer_horizon
from .runtime import NumberedSpan


@dataclasses.dataclass(frozen=True)
class NumberedVariant:
    module: fx.GraphModule
    inputs: list  # the graph's inputs, then the published indices (reads), then the buffer (publishes)
    extra_inputs: int
    nodes_removed: int  # nodes the leading S layers no longer run


def _covers(detection: Detection, layers: tuple[int, ...]) -> tuple[int, int]:
    """The layers the graph runs, first and last: its indexer layers and the layers its module paths show without
    one (a dense layer), where they make one unbroken run; else its indexer layers' span."""
    present = set(detection.layers_present) | set(layers)
    low, high = min(present), max(present)
    return (low, high) if present == set(range(low, high + 1)) else (layers[0], layers[-1])


def _publisher(config: IndexCacheConfig, layers: tuple[int, ...], writer: int | None, covers: tuple[int, int],
               horizon: int) -> int | None:
    """The graph's last F layer (``writer``), which the engines' one buffer holds when the graph ends, where it is
    one of the graph's indexer sites and an S layer may read that buffer from a later graph: one after the graph's
    last indexer layer, up to the layer right after the graph (the layers it shows without an indexer may be
    dense, or the first ops of a layer whose indexer a break moved)."""
    after = range(max(layers[-1], writer or 0) + 1, min(covers[1] + 2, horizon))
    if writer not in layers or not any(config.layer_kind(layer) == SHARED for layer in after):
        return None
    return writer


def _indexed_layers(detection: Detection) -> tuple[int, ...]:
    """Every layer of the graph that selects indices: its sites, and the layers the pass leaves computing (two
    indexers, a selection it cannot read). The engines' buffer is written by all of them alike."""
    found = {site.layer for site in detection.sites}
    found |= {site.layer for site, _ in detection.unplaced if site.layer is not None}
    found |= {hidden.layer for hidden in detection.hidden if hidden.layer is not None}
    return tuple(sorted(found))


def _writer(config: IndexCacheConfig, indexed: tuple[int, ...]) -> int | None:
    """The graph's last indexed layer marked F: the one that writes the buffer last."""
    marked = [layer for layer in indexed if config.layer_kind(layer) == FULL]
    return marked[-1] if marked else None


def _readers(config: IndexCacheConfig, layers: tuple[int, ...], indexed: tuple[int, ...],
             stage_first_layer: int = 0) -> list[int]:
    """The graph's S sites that come before its first indexed layer marked F: the buffer they read was written by
    an earlier graph, in this process (a pipeline stage's layers never read a layer of an earlier stage, which runs
    elsewhere and publishes nothing here)."""
    first_f = next((layer for layer in indexed if config.layer_kind(layer) == FULL), None)
    return [layer for layer in layers if config.layer_kind(layer) == SHARED and (first_f is None or layer < first_f)
            and (source := config.source_layer(layer)) is not None and stage_first_layer <= source]


def _container(detection: Detection) -> str | None | bool:
    """The layer container the sites' module paths name; None: no path names one; False: several do."""
    if detection.model_container is not None:  # the paths named it through a frame local
        return detection.model_container
    if detection.container:  # the container the layer numbers come from (the layers that read an indexer list's
        return detection.container  # indices), as layer_slot spells it
    names = {key[0] for site in detection.sites if (key := layer_key(site.module_path or "")) is not None}
    return False if len(names) > 1 else next(iter(names), None)


def numbered_needs(detection: Detection, config: IndexCacheConfig, model_layers: int | None,
                   stage_first_layer: int | None = None):
    """``(layers, readers, publisher)`` of a numbered graph, or None when it exchanges nothing across graphs.
    ``stage_first_layer``: the graph is part of a pipeline stage that starts there."""
    if not config.use_index_cache or not detection.sites or detection.unknown_reason is not None:
        return None
    if detection.nested_regions:
        return None  # nested_compile_region bodies are rewired inside the graph (regional.py)
    layers = tuple(sorted(site.layer for site in detection.sites))
    if len(set(layers)) != len(layers):
        return None
    covers, indexed = _covers(detection, layers), _indexed_layers(detection)
    writer = _writer(config, indexed)
    readers = _readers(config, layers, indexed, stage_first_layer or 0)
    publisher = _publisher(config, layers, writer, covers, layer_horizon(config, model_layers))
    if not readers and publisher is None:
        return None
    return layers, readers, publisher, covers, writer


def plan_span(module: fx.GraphModule, detection: Detection, config: IndexCacheConfig, needs) -> NumberedSpan | str:
    """The ``NumberedSpan`` of a graph that needs one, or why (str) its layers must compute as they are."""
    layers, readers, publisher, covers, writer = needs
    container = _container(detection)
    if container is False:
        return "its indexers' module paths name more than one layer container"
    by_layer = {site.layer: site for site in detection.sites}
    involved = [*readers, *([] if publisher is None else [publisher])]
    for layer in involved:
        site = by_layer[layer]
        if site.key_axis() is None:
            return (f"layer {layer} is a {site.kind} site, not a selection from a score tensor; only those "
                    "(aten.topk, a sort cut to k) are built")
        why = site.refusal()
        if why is not None:
            return f"layer {layer}: {why}"
    expected = {layer: expected_indices(module.graph, by_layer[layer]) for layer in involved}
    if None in expected.values():
        return "an indices shape uses a size no graph input carries, so it cannot be checked per call"
    shapes = {expected[layer].sizes[:-1] for layer in readers}  # symbolic: equal for every call, or not proven
    if len(shapes) > 1:
        return f"the leading S layers {readers} make indices of different shapes"
    return NumberedSpan(layers, container if isinstance(container, str) else None,
                        tuple((layer, expected[layer]) for layer in readers),
                        None if publisher is None else (publisher, expected[publisher]),
                        covers=covers, writes=writer)


def build_variant(module: fx.GraphModule, inputs: Sequence, graph_pass, span: NumberedSpan) -> NumberedVariant | None:
    """The graph with the pass's in-graph sharing, its leading S layers reading one more input and its
    publishing layer writing one more; None when a leading S layer's indexer stays needed."""
    variant = copy_graph_module(module)
    detection = graph_pass.share_in_place(variant.graph)  # the pass's in-graph sharing, as the as-is graph gets it
    by_layer = {site.layer: site for site in detection.sites}
    extra, removed = [], 0
    if span.reads:
        readers = [by_layer[layer] for layer, _ in span.reads]
        example = example_indices(readers[0])
        removed = read_indices(variant, readers, example)
        if removed is None:
            return None
        extra.append(example)
    if span.publishes is not None:
        site = by_layer[span.publishes[0]]
        extra.append(example_indices(site))
        write_indices(variant, site)
    variant.recompile()
    return NumberedVariant(variant, [*inputs, *extra], len(extra), removed)
