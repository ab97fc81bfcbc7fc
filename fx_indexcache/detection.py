"""Find every indexer site in a graph and give each its global decoder-layer index.

Site finders are registered per graph form (plain ``aten.topk`` here; vLLM's opaque
indexer op registers its own), so the rewrite never needs to know which form it edits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import fx

from .detect_topk import TopkVerdict, find_topk_sites
from .graph_utils import node_order
from .layers import layer_index_from_path
from .sites import IndexerSite

SiteFinder = Callable[[fx.Graph], tuple[list[IndexerSite], list[TopkVerdict]]]

SITE_FINDERS: dict[str, SiteFinder] = {"aten.topk": find_topk_sites}

LAYER_FROM_PATH = "module path"
LAYER_FROM_ORDER = "graph order"


def register_site_finder(name: str, finder: SiteFinder) -> None:
    """Add a finder for another graph form of the indexer (idempotent per name)."""
    SITE_FINDERS[name] = finder


@dataclasses.dataclass
class Detection:
    """Indexer sites sorted by layer, the top-k left alone, and what could not be placed."""

    sites: list[IndexerSite]
    ignored: list[TopkVerdict]
    unplaced: list[tuple[IndexerSite, str]]
    nested_regions: list[str]  # subgraphs (nested_compile_region bodies) that hold indexers
    layer_source: str


def _subgraph_modules(graph: fx.Graph) -> list[tuple[str, fx.GraphModule]]:
    owner = graph.owning_module
    if owner is None:
        return []
    found = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            target = getattr(owner, str(node.target), None)
            if isinstance(target, fx.GraphModule):
                found[str(node.target)] = target
    return list(found.items())


def _find_all(graph: fx.Graph) -> tuple[list[IndexerSite], list[TopkVerdict]]:
    sites: list[IndexerSite] = []
    ignored: list[TopkVerdict] = []
    for finder in SITE_FINDERS.values():
        found, skipped = finder(graph)
        sites.extend(found)
        ignored.extend(skipped)
    order = node_order(graph)
    sites.sort(key=lambda site: order[site.anchor])
    return sites, ignored


def detect(graph: fx.Graph) -> Detection:
    """Find the sites and assign layers: from module paths when every site has one, else by order.

    Graph order is the order along the residual stream; it equals the decoder-layer index only
    when the graph starts at the model's first DSA layer, which the report states.
    """
    sites, ignored = _find_all(graph)
    nested = []
    for name, module in _subgraph_modules(graph):
        inner, _ = _find_all(module.graph)
        if inner:
            nested.append(f"{name} ({len(inner)} indexer top-k)")

    layers = [layer_index_from_path(site.module_path) for site in sites]
    unplaced: list[tuple[IndexerSite, str]] = []
    if sites and all(layer is not None for layer in layers):
        source = LAYER_FROM_PATH
        seen: dict[int, IndexerSite] = {}
        placed = []
        for site, layer in zip(sites, layers):
            if layer in seen:
                unplaced.append((site, f"a second indexer site in layer {layer}"))
                unplaced.append((seen[layer], f"a second indexer site in layer {layer}"))
                continue
            seen[layer] = site
            site.layer, site.layer_source = layer, source
            placed.append(site)
        doubled = {id(site) for site, _ in unplaced}
        sites = [site for site in placed if id(site) not in doubled]
    else:
        source = LAYER_FROM_ORDER
        for layer, site in enumerate(sites):
            site.layer, site.layer_source = layer, source
    sites.sort(key=lambda site: site.layer)
    return Detection(sites, ignored, unplaced, nested, source)
