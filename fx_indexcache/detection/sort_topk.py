"""Detect lightning-indexer top-k written as a sort cut to its first k keys.

``scores.sort(dim, descending=True).indices[..., :k]`` and ``scores.argsort(dim, descending=True)[..., :k]`` pick
the same keys as ``scores.topk(k, dim).indices`` (up to the order of equal scores), and trace to
``getitem(aten.sort(score, ...), 1)`` followed by ``aten.slice(indices, dim, 0, k)`` (``torch.export`` keeps
``aten.argsort(score, ...)``, whose one output is that order). What makes such a selection
an indexer's is decided by the score, exactly as for ``aten.topk`` (``topk.classify_selection``). A site's
indices are the cut; an S layer's cut is replaced by its F layer's. Only a cut that starts at 0 with step 1 on the
sorted axis, where the sorted values and the whole order are read by nothing else, is a top-k: any other sort
(a sampler's top-p, a sort kept whole) is not a selection of k keys and is not reported.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from ..graph_utils import call_arguments, fake_value, getitem_users, is_call
from .graph_inputs import parameter_placeholders
from .layers import module_path
from .registry import register_site_finder
from .sites import CacheWrite, IndexerSite
from .topk import cache_writes_feeding_only, classify_selection

aten = torch.ops.aten


#: The sorts a cut can make a top-k: ``aten.sort`` (its order is output 1) and ``aten.argsort`` (its only output),
#: each ``.default`` or ``.stable`` (whose arguments but ``self`` are keywords); not the out= or list overloads.
_SORTS = {aten.sort.default: 1, aten.sort.stable: 1, aten.argsort.default: None, aten.argsort.stable: None}


def is_sort(node: fx.Node) -> bool:
    """Whether ``node`` sorts a tensor and outputs its order (``aten.sort`` or ``aten.argsort``)."""
    return node.op == "call_function" and node.target in _SORTS


def sort_order(node: fx.Node) -> list[fx.Node]:
    """The nodes that are ``node``'s order: the argsort itself, or the sort's getitems of output 1."""
    output = _SORTS[node.target]
    return [node] if output is None else getitem_users(node, output)


def sort_arguments(node: fx.Node) -> tuple:
    """``(self, dim, descending, stable)`` of a sort (``is_sort``), defaults filled."""
    positional = ("self", "dim", "descending") if node.target in (aten.sort.default, aten.argsort.default) else ("self",)
    values = call_arguments(node, positional, {"self": None, "dim": -1, "descending": False, "stable": None})
    return values["self"], values["dim"], values["descending"], values["stable"]


def slice_arguments(node: fx.Node) -> tuple:
    """``(self, dim, start, end, step)`` of an ``aten.slice.Tensor`` call, defaults filled."""
    names = ("self", "dim", "start", "end", "step")
    values = call_arguments(node, names, {"self": None, "dim": 0, "start": None, "end": None, "step": 1})
    return tuple(values[name] for name in names)


def leading_cut(sort: fx.Node) -> fx.Node | str:
    """The ``aten.slice`` that keeps the first k of the sort's order on its axis, or why the sort is not a top-k."""
    score, dim, _, _ = sort_arguments(sort)
    value = fake_value(score)
    if not isinstance(value, torch.Tensor):
        return "sort input carries no shape metadata"
    if _SORTS[sort.target] is not None and any(v.users for v in getitem_users(sort, 0)):
        return "the sorted values are read"
    orders = sort_order(sort)
    if len(orders) != 1 or len(orders[0].users) != 1:
        return "the order is read other than through one cut"
    (cut,) = orders[0].users
    if not is_call(cut, {aten.slice}):
        return f"the order is read by {cut.target}, not cut to its first k"
    _, cut_dim, start, _, step = slice_arguments(cut)
    ndim = value.dim()
    if cut_dim % ndim != dim % ndim or start not in (None, 0) or step != 1:
        return "the cut is not the first k keys of the sorted axis"
    return cut


@dataclasses.dataclass(eq=False)
class SortIndexerSite(IndexerSite):
    """An indexer whose indices are ``aten.slice(getitem(aten.sort(score, dim, descending), 1), dim, 0, k)`` (or the
    same cut of ``aten.argsort``: the same selection, so the two share)."""

    kind = "aten.sort"

    def refusal(self) -> str | None:
        cut = leading_cut(self.anchor)
        return cut if isinstance(cut, str) else None

    def incompatibility(self, source: IndexerSite, sizes=None) -> str | None:
        sizes = sizes or self.sizes()
        reason = super().incompatibility(source, sizes)
        if reason is not None:
            return reason
        assert isinstance(source, SortIndexerSite)
        score, dim, descending, stable = sort_arguments(self.anchor)
        score2, dim2, descending2, stable2 = sort_arguments(source.anchor)
        if (dim % fake_value(score).dim() != dim2 % fake_value(score2).dim() or descending != descending2
                or bool(stable) != bool(stable2)):
            return f"sort dim/descending/stable differ from layer {source.layer}'s"
        # the cut's end is its k: the indices shapes (compared above) hold min(k, keys) on the cut axis
        return self.key_width_mismatch(source, sizes.same_size)

    def cache_writes(self) -> list[CacheWrite]:
        return cache_writes_feeding_only([self.anchor, *self.anchor.users])

    def key_axis(self) -> int:
        return sort_arguments(self.anchor)[1]


def find_sort_sites(graph: fx.Graph) -> tuple[list[IndexerSite], list]:
    """Every indexer selection written as a sort cut to its first k keys; other sorts are not top-k, not reported."""
    sites: list[IndexerSite] = []
    params = parameter_placeholders(graph)
    for node in graph.nodes:
        if not is_sort(node):
            continue
        cut = leading_cut(node)
        if isinstance(cut, str):
            continue
        score, dim, _, _ = sort_arguments(node)
        verdict = classify_selection(node, score, dim, params)
        if verdict.is_indexer:
            sites.append(SortIndexerSite(node, cut, module_path(node), verdict.evidence))
    return sites, []


register_site_finder("aten.sort cut to k", find_sort_sites)
