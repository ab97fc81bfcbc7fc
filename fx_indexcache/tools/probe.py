"""``IndexProbe``: a ``torch.compile`` backend that records, and can swap, every DSA layer's top-k.

Nothing in the model is edited. On the ATen graph that AOTAutograd hands over, the probe runs
``detect`` and then

* adds every site's indices (and a flag per selected slot: is its score finite, i.e. a real key and
  not padding chosen because k exceeds the visible keys) to the graph's outputs; the compiled
  function strips those extra outputs again and keeps them in ``probe.records``;
* puts a selector between each site's indices and their consumers that, at run time, hands the
  consumers either the layer's own indices or those of another earlier layer, following
  ``probe.pattern`` (an F/S string read on every call). All indexers stay in the graph, so one
  trace serves every pattern: ``pattern_search`` uses this to score candidates without recompiling.

The graph runs eagerly (no Inductor), like ``indexcache_eager_backend``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Callable, Iterator

import torch
from torch import fx

from ..config import FULL, IndexCacheConfig
from ..detection.registry import detect
from ..graph_utils import comes_after


@dataclasses.dataclass
class ProbedGraph:
    """What the probe found in one compiled graph."""

    layers: list[int]  # DSA layers whose indices this graph records
    switchable: dict[int, list[int]]  # layer -> earlier layers whose indices it may take at run time
    fixed: dict[int, str]  # layer -> why it cannot take another layer's indices (stays F)


@dataclasses.dataclass
class LayerRecord:
    """One layer's selection in one call: indices ``[..., k]`` and which slots hold a real key."""

    indices: torch.Tensor
    valid: torch.Tensor | None  # bool, same shape; None where the top-k values were not reachable


def source_layers(pattern: str | None, layers: list[int]) -> dict[int, int]:
    """``{S layer: the layer whose indices it reuses}``, by the pass's own rule, so a probed pattern runs as compiled.

    The engines' one-buffer rule over the indexed ``layers`` (``IndexCacheConfig.buffer_sources``; layers past the
    pattern count as F): an S layer reads the nearest preceding indexed layer that computed, whatever the layers
    between (DeepSeek-V4's indexer-less layers) are marked; one with nothing computed before it computes.
    """
    if pattern is None or not layers:
        return {}
    padded = pattern + FULL * (max(layers) + 1 - len(pattern))
    config = IndexCacheConfig(use_index_cache=True, index_topk_pattern=padded)
    return {layer: source for layer, source in sorted(config.buffer_sources(layers).items()) if source != layer}


def _finite_mask(values: torch.Tensor) -> torch.Tensor:
    """Slots whose top-k score is a real score (masked keys score -inf or the dtype's lowest value)."""
    if not values.is_floating_point():
        return torch.ones_like(values, dtype=torch.bool)
    return torch.isfinite(values) & (values > torch.finfo(values.dtype).min / 2)


class IndexProbe:
    """``torch.compile`` backend that records every DSA layer's top-k and can swap them by pattern.

    ``probe.pattern`` (None: every layer uses its own indices) is read on every call; set it with
    ``with probe.use(pattern):``. ``probe.records`` maps layer -> ``LayerRecord`` of the last call
    (cleared by ``probe.clear()``; a model split over several graphs fills it from each).
    """

    def __init__(self, switchable: bool = True) -> None:
        self.switchable = switchable
        self.graphs: list[ProbedGraph] = []
        self.records: dict[int, LayerRecord] = {}
        self._pattern: str | None = None
        self.sources: dict[int, int] = {}

    # ---- pattern ----------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted({layer for graph in self.graphs for layer in graph.layers})

    @property
    def fixed(self) -> dict[int, str]:
        """Layers that cannot be made S (in some graph), with the reason."""
        out: dict[int, str] = {}
        for graph in self.graphs:
            out.update(graph.fixed)
        return out

    @property
    def pattern(self) -> str | None:
        return self._pattern

    @pattern.setter
    def pattern(self, pattern: str | None) -> None:
        if pattern is not None and (not pattern or set(pattern) - {"F", "S"}):
            raise ValueError(f"pattern {pattern!r} must be a non-empty F/S string")
        self._pattern = pattern
        self.sources = source_layers(pattern, self.layers)

    @contextlib.contextmanager
    def use(self, pattern: str | None) -> Iterator[None]:
        previous = self._pattern
        self.pattern = pattern
        try:
            yield
        finally:
            self.pattern = previous

    def clear(self) -> None:
        self.records = {}

    def select(self, layer: int, choices: tuple[int, ...], *indices: torch.Tensor) -> torch.Tensor:
        """Run-time selector (a graph node): the indices ``layer`` attends with under ``self.pattern``.

        ``choices`` names the layer of each tensor in ``indices``; the last one is the layer's own.
        """
        source = self.sources.get(layer)
        if source is not None and source in choices:
            return indices[choices.index(source)]
        return indices[-1]

    # ---- compile ----------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs):
        from ..integrations.backend import aten_graph_backend

        return aten_graph_backend(self._instrument)(gm, example_inputs)

    def _instrument(self, module: fx.GraphModule) -> Callable:
        from ..detection.frames import dynamo_graph_starts_at_first_layer

        graph = module.graph
        detection = detect(graph, dynamo_graph_starts_at_first_layer())
        sites = [] if detection.unknown_reason is not None else detection.sites  # no layer number: nothing to switch
        info = _eligibility(sites)  # before adding anything: our own value reads would look like a use
        if self.switchable:
            self._insert_selectors(graph, sites, info)
        n_out, layers = _add_record_outputs(graph, sites)
        graph.lint()
        module.recompile()
        self.graphs.append(info)

        def run(*args):
            results = module(*args)
            for i, layer in enumerate(layers):
                indices, valid = results[n_out + 2 * i], results[n_out + 2 * i + 1]
                self.records[layer] = LayerRecord(indices, valid)
            return list(results[:n_out])

        return run

    def _insert_selectors(self, graph: fx.Graph, sites: list, info: ProbedGraph) -> None:
        """Each consumer of layer i's indices reads select(i, earlier layers' indices..., own) instead."""
        by_layer = {site.layer: site for site in sites}
        for site in sites:
            choices = info.switchable.get(site.layer)
            if not choices:
                continue
            own = site.indices
            with graph.inserting_after(own):
                args = (site.layer, (*choices, site.layer), *[by_layer[c].indices for c in choices], own)
                chosen = graph.call_function(self.select, args)
            chosen.meta.update(own.meta)
            own.replace_all_uses_with(chosen, delete_user_cb=lambda user, chosen=chosen: user is not chosen)


def _eligibility(sites: list) -> ProbedGraph:
    """Which layers can read which earlier layers' indices, and why the others stay fixed."""
    info = ProbedGraph([site.layer for site in sites], {}, {})
    for site in sites:
        reason = site.refusal()
        if site.key_axis() is None:  # e.g. vLLM's opaque op writes a buffer: no plain edge to switch
            reason = f"{site.kind} indexer sites are recorded, not switched"
        if reason is not None:
            info.fixed[site.layer] = reason
            continue
        choices, why_not = _earlier_choices(site, sites)
        info.switchable[site.layer] = choices
        if not choices and why_not:
            info.fixed[site.layer] = f"no earlier layer's indices can replace its own ({why_not})"
    return info


def _earlier_choices(site, sites: list) -> tuple[list[int], str]:
    """The earlier layers whose indices can stand in for ``site``'s, and why the last refused one cannot."""
    choices, why_not = [], ""
    for source in sites:
        if source.layer >= site.layer:
            continue
        if comes_after(source.indices, site.indices):
            why_not = f"layer {source.layer}'s indices are computed after this layer's"
            continue
        reason = site.incompatibility(source)
        if reason is None:
            choices.append(source.layer)
        else:
            why_not = reason
    return choices, why_not


def _add_record_outputs(graph: fx.Graph, sites: list) -> tuple[int, list[int]]:
    """Extra graph outputs: each layer's own indices and which selected slots are real keys.

    Returns the original output count and the layer of each (indices, valid) pair after it.
    """
    output = next(node for node in graph.nodes if node.op == "output")
    original = output.args[0]
    extras, layers = [], []
    with graph.inserting_before(output):
        for site in sites:
            extras.append(site.indices)
            anchor = site.anchor
            values = None  # the selected keys' scores: a top-k's own, a sort cut's gathered; other kinds have none
            if anchor.target is torch.ops.aten.topk.default:
                values = graph.call_function(operator.getitem, (anchor, 0))
            elif site.key_axis() is not None:
                values = graph.call_function(torch.ops.aten.gather.default,
                                             (anchor.args[0], site.key_axis(), site.indices))
            extras.append(None if values is None else graph.call_function(_finite_mask, (values,)))
            layers.append(site.layer)
    output.args = ((*original, *extras),)
    return len(original), layers
