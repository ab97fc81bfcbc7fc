"""Rewire every S layer to its F layer's indices and delete what became dead.

The driver decides per layer from the config and the detected sites, asks each site whether
the swap is safe, and leaves a layer untouched (with the reason) whenever it is not: the
result is either the IndexCache semantics or the original computation, never something else.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from .config import FULL, IndexCacheConfig
from .detection import Detection
from .graph_utils import CONTRACTIONS, dead_if_removed, erase_dead, fake_value, is_call, numel_hint
from .sites import IndexerSite

COMPUTED, SHARED, LEFT = "computed", "shared", "left as is"


@dataclasses.dataclass
class LayerDecision:
    """What the pass did with one DSA layer of one graph."""

    layer: int
    marked: str  # "F" or "S", as the config marks the layer
    action: str  # COMPUTED, SHARED or LEFT
    source_layer: int | None  # the layer whose indices this layer uses
    nodes_removed: int = 0
    flops_removed_per_token: float = 0.0
    cache_bytes_saved: int = 0
    note: str = ""


def _flops(node: fx.Node) -> int:
    """Rough FLOP count of one node at the traced sizes: 2·M·N·K for products, numel otherwise."""
    value = fake_value(node)
    if not isinstance(value, torch.Tensor):
        return 0
    if is_call(node, {torch.ops.aten.einsum}):
        return _einsum_flops(node)
    out = numel_hint(value.shape)
    if is_call(node, CONTRACTIONS):
        operands = node.all_input_nodes
        first = fake_value(operands[1] if len(operands) > 2 else operands[0])
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            return 2 * out * numel_hint(first.shape[-1:])
    return out


def _einsum_flops(node: fx.Node) -> int:
    """2 × the product of every index's size: the multiply-adds of a plain einsum."""
    equation, operands = node.args[0], node.args[1]
    sizes: dict[str, int] = {}
    for letters, operand in zip(equation.split("->")[0].split(","), operands):
        value = fake_value(operand)
        for letter, size in zip(letters.strip(), value.shape if value is not None else ()):
            sizes[letter] = numel_hint([size])
    total = 2
    for size in sizes.values():
        total *= size
    return total


def _queries(site: IndexerSite) -> int:
    """How many query tokens one call scores: the indices' numel over k."""
    value = fake_value(site.indices)
    if value is None or value.dim() == 0:
        return 1
    return max(numel_hint(value.shape[:-1]), 1)


def _share(graph: fx.Graph, site: IndexerSite, source: IndexerSite, drop_writes: bool) -> LayerDecision:
    """Rewire one S layer and erase exactly the nodes that only its indexer needed.

    Erasing the dead cone directly (not a whole-graph DCE per layer) keeps the pass linear in
    the graph size for deep models.
    """
    roots = [site.anchor, *site.anchor.users, site.indices]
    site.reuse(source)
    saved = 0
    if drop_writes:
        for write in site.cache_writes():
            roots.extend(write.write.all_input_nodes)
            graph.erase_node(write.write)
            saved += write.nbytes
    candidates = [node for node in dict.fromkeys(roots) if node.graph is graph and not node.users]
    removed = dead_if_removed(node for node in candidates if not node.is_impure())
    flops = sum(_flops(node) for node in removed) / _queries(site)
    erase_dead(graph, removed)
    return LayerDecision(
        site.layer, "S", SHARED, source.layer, len(removed), flops, saved, f"uses layer {source.layer}'s indices"
    )


def apply_index_cache(graph: fx.Graph, detection: Detection, config: IndexCacheConfig) -> list[LayerDecision]:
    """Rewrite ``graph`` in place; one decision per detected site, in layer order."""
    by_layer = {site.layer: site for site in detection.sites}
    decisions = []
    for site in detection.sites:
        layer = site.layer
        if config.layer_kind(layer) == FULL:
            decisions.append(LayerDecision(layer, "F", COMPUTED, layer))
            continue
        source_layer = config.source_layer(layer)
        if source_layer is None:
            note = "marked S with no F layer before it: computed as F (vLLM would read an unset buffer)"
            decisions.append(LayerDecision(layer, "S", COMPUTED, layer, note=note))
            continue
        source = by_layer.get(source_layer)
        if source is None:
            reason = (
                f"its F layer {source_layer} has no indexer site in this graph "
                "(graph break, pipeline stage, compiled region, or a layer without an indexer)"
            )
        else:
            reason = site.refusal() or site.incompatibility(source)
        if reason is not None:
            decisions.append(LayerDecision(layer, "S", LEFT, layer, note=reason))
            continue
        decisions.append(_share(graph, site, source, config.drop_shared_indexer_cache_writes))
    graph.eliminate_dead_code()
    graph.lint()
    return decisions
