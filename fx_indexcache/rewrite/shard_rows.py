"""Split each computing indexer's query rows across the ranks of a process group, and all-gather the top-k.

Under tensor parallelism every rank runs the indexer on the same hidden states: its cost is replicated, not
divided (15.9 % of prefill at 131K on 8 H100s, in vLLM). With ``shard_indexer_rows`` each of the W ranks scores
``C = ceil(T / W)`` of the T query rows of every computing indexer (F layers, and layers left as they are), takes
the top-k of its rows, and the indices (int32 on the wire) are all-gathered in rank order and trimmed to T rows:
every rank ends with the same ``[.., T, k]`` indices, and the scoring cost per rank falls by W.

How the rows are cut: from the score the top-k reads, the pass walks up through the ops that compute each row
from the same row of their inputs (``row_axis``), as far as each value is used only on that path, and runs a copy
of that cone on a slice: where the walk stops (a graph input, a value used elsewhere, an op that reads positions
or mixes rows), the value is computed whole, as before, and sliced on its row axis. The walk must reach the q·k
product, or the layer is refused: splitting only the top-k would cost an all-gather and save little.

Why the indices are the replicated indexer's (the proof):

1. Each copied node equals the original node sliced to this rank's rows, by induction in graph order. A slice
   at the frontier is one by construction. A copied op gets, per input, either the whole input (it is the same
   for every row: no row axis, or size 1 there) or that input's slice on its row axis; ``row_axis`` admits only
   ops for which ``op(rows r0..r1 of the inputs) == rows r0..r1 of op(inputs)``: pointwise ops and casts,
   re-views that keep each row one block, permutations, reductions over other axes, the row side of ``mm`` /
   ``bmm``. So the copied score is ``score[.., r0:r1, :]``.
2. The top-k reduces the last (key) axis, row by row, with the same ``k``, ``largest`` and ``sorted``: the top-k
   of the slice is the slice of the top-k.
3. The all-gather concatenates the ranks' ``C``-row blocks in rank order (the last ones padded, the padding
   trimmed), so row ``i`` of the result is row ``i`` of the replicated top-k; int32 carries any index below 2^31.
4. Row positions stay global. An op that reads a row's position (a causal mask from ``tril`` or ``arange``, a
   cumulative sum, an index by position) is never copied onto a slice: it runs whole and its output is sliced,
   so rank r's row i still masks as row ``r0 + i``. Per-request data (lengths, request ids, positions: several
   requests in one batch, or their tokens in one flattened row axis) reaches the score through the same row-wise
   ops and is sliced with it, or is computed whole and sliced: a row keeps its own request's mask. Re-deriving
   positions on the local slice is the failure the engines hit at concurrency > 1; this construction cannot
   express it.

Step 1 holds bit for bit when each kernel's arithmetic for a row does not depend on how many rows it computes:
true of pointwise ops and of the CPU's matrix products in the tests (the indices are compared for equality); a
GPU GEMM may choose another tiling for fewer rows, and then near-tied keys can swap (not measured on GPUs yet).
Ties at the k-th value (an early causal row with fewer than k keys: ``-inf`` ties) are broken by the top-k
kernel on the row alone. Every rank always holds the same indices: they are the gathered ones.

Refused, with the reason in the report: a site other than a plain ``aten.topk``; top-k values that are used; a
top-k over another axis than the last; a symbolic (dynamic) row count; a single query row (a decode step); a
score whose rows are not computed row by row back to the q·k product.
"""

from __future__ import annotations

import collections
import dataclasses
import operator

import torch
from torch import fx

from ..detection.sites import IndexerSite
from ..detection.topk import TopkIndexerSite, topk_arguments
from ..graph_utils import CONTRACTIONS, fake_value, is_call, node_order
from .row_axis import RowAxis, input_rows, sliced_arguments

aten = torch.ops.aten
_functional = torch.ops._c10d_functional
_VIEWS = {aten.view, aten._unsafe_view}  # re-views that need a contiguous input (a slice may not be)

#: The backend option and ``IndexCachePass`` argument that switches row sharding on.
SHARD_ROWS_KEY = "shard_indexer_rows"


@dataclasses.dataclass(frozen=True)
class ShardGroup:
    """The ranks that split the rows: this process's rank, their count, and the c10d name collectives use."""

    rank: int
    size: int
    name: str

    @classmethod
    def current(cls) -> ShardGroup | str:
        """The default process group, or why there is none to split over."""
        import torch.distributed as dist

        if not dist.is_available():
            return "torch.distributed is not available in this torch build"
        if not dist.is_initialized():
            return "no process group is initialised (torch.distributed.init_process_group)"
        size = dist.get_world_size()
        if size < 2:
            return "the default process group has one rank"
        return cls(dist.get_rank(), size, dist.group.WORLD.group_name)

    def rows(self, total: int) -> tuple[int, int, int]:
        """This rank's rows ``[start, stop)`` of ``total``, and the rows each rank sends (the last ones padded)."""
        per = -(-total // self.size)
        start = min(self.rank * per, total)
        return start, min(start + per, total), per

    def key(self) -> str:
        """What the compiled graph depends on: part of the pass's uuid (each rank compiles its own rows)."""
        return f"{self.rank}/{self.size}"


@dataclasses.dataclass(frozen=True)
class RowShardRecord:
    """One computing indexer under ``shard_indexer_rows``: the rows this rank scores, or why it runs whole."""

    layer: int | None
    site: str
    rows: int | None = None
    start: int = 0
    stop: int = 0
    rank: int = 0
    size: int = 1
    reason: str | None = None
    products: int = 0  # matrix products now run on this rank's rows only (the q and weight projections, q·k)

    @property
    def sharded(self) -> bool:
        return self.reason is None

    def note(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else f"indexer {self.site}"
        if self.reason is not None:
            return f"{where}: indexer rows not split across ranks ({self.reason}); it runs whole on every rank"
        mine = f"rows {self.start}-{self.stop - 1}" if self.stop > self.start else "no rows"
        return (f"{where}: indexer {mine} of {self.rows} scored on rank {self.rank} of {self.size} ({self.products} "
                "matrix products on these rows); the top-k rows are all-gathered")


def shard_indexer_rows(graph: fx.Graph, sites: list[IndexerSite], group: ShardGroup | str) -> list[RowShardRecord]:
    """Split the query rows of every site still in ``graph`` (the computing ones) across ``group``; one record
    per site. ``group`` is a reason (str) when there is no group to split over: then nothing changes."""
    records = []
    for site in sites:
        if getattr(site.anchor, "_erased", False) or site.anchor.graph is not graph:
            continue  # shared: its indexer is gone
        records.append(_shard(graph, site, group))
    if any(record.sharded for record in records):
        graph.eliminate_dead_code()
        graph.lint()
    return records


@dataclasses.dataclass
class _Cone:
    """The nodes copied onto the slice (each with its row axis) and the values sliced where the walk stopped."""

    copied: dict[fx.Node, RowAxis]
    inputs: dict[fx.Node, dict[fx.Node, RowAxis | None]]  # per copied node: each input's row axis, None: whole
    sliced: dict[fx.Node, set[RowAxis]]
    stopped_at: list[fx.Node]  # ops that read positions or mix rows, where the walk stopped (for the refusal)


def _refusal(site: IndexerSite, group: ShardGroup | str) -> str | None:
    if isinstance(group, str):
        return group
    if not isinstance(site, TopkIndexerSite):
        return f"a {site.kind} site: only plain aten.topk indexers are split"
    reason = site.refusal()
    if reason is not None:
        return reason
    score, _, dim, _, _ = topk_arguments(site.anchor)
    value = fake_value(score)
    if value is None or value.dim() < 2:
        return "the score has no query-row axis (fewer than 2 dims)"
    if dim % value.dim() != value.dim() - 1:
        return f"the top-k reduces axis {dim} of a {value.dim()}-dim score, not the last (key) axis"
    rows = value.shape[-2]
    if not isinstance(rows, int) or any(not isinstance(s, int) for s in value.shape):
        return "the score's shape is symbolic (dynamic shapes): each rank's rows would have to be cut at run time"
    if rows < 2:
        return "one query row (a decode step): nothing to split"
    return None


def _walk(anchor: fx.Node, score: fx.Node, rows: RowAxis) -> _Cone:
    """From the score up, in reverse graph order (every user of a node is decided before the node): a node is
    copied when every user is a copied node that wants its rows on one axis and the op is row-wise there."""
    wanted: dict[fx.Node, set[RowAxis]] = collections.defaultdict(set)
    wanted[score].add(rows)
    cone = _Cone({}, {}, {}, [])
    pending = {score}  # wanted and not decided yet: the walk ends when none is left
    node: fx.Node | None = score
    while pending and node is not None and node.op != "root":
        axes = wanted.get(node)
        if axes:
            pending.discard(node)
            demands = _demands(node, axes, anchor, score, cone)
            if demands is None:
                cone.sliced[node] = axes
                if node.op == "call_function" and node.all_input_nodes and input_rows(node, min(axes, key=str)) is None:
                    cone.stopped_at.append(node)
            else:
                (axis,) = axes
                cone.copied[node], cone.inputs[node] = axis, demands
                for arg, arg_axis in demands.items():
                    if arg_axis is not None:
                        wanted[arg].add(arg_axis)
                        pending.add(arg)
        node = node.prev
    return cone


def _demands(node: fx.Node, axes: set[RowAxis], anchor: fx.Node, score: fx.Node, cone: _Cone):
    if len(axes) != 1:
        return None
    if node is score:
        if set(node.users) != {anchor}:
            return None
    elif not all(user in cone.copied and cone.inputs[user].get(node) is not None for user in node.users):
        return None  # needed whole elsewhere: slicing its value costs nothing more
    (axis,) = axes
    return input_rows(node, axis)


def _shard(graph: fx.Graph, site: IndexerSite, group: ShardGroup | str) -> RowShardRecord:
    reason = _refusal(site, group)
    if reason is not None:
        return RowShardRecord(site.layer, site.anchor.name, reason=reason)
    assert isinstance(group, ShardGroup)
    score = site.anchor.args[0]
    value = fake_value(score)
    rows = value.shape[-2]
    cone = _walk(site.anchor, score, RowAxis(value.dim() - 2))
    products = sum(is_call(node, CONTRACTIONS) for node in cone.copied)
    if not products:
        ops = ", ".join(dict.fromkeys(str(node.target) for node in cone.stopped_at))
        why = f"{ops} reads row positions or mixes rows" if ops else "a value on the way is also used elsewhere"
        return RowShardRecord(site.layer, site.anchor.name, rows, reason=(
            f"the score's rows are not computed row by row back to the q·k product ({why}), so only the top-k "
            "could be split"))
    start, stop, per = group.rows(rows)
    indices = _emit(graph, site, cone, start, stop)
    gathered = _all_gather_rows(graph, site, indices, value.dim() - 2, rows, stop - start, per, group)
    site.indices.replace_all_uses_with(gathered)
    return RowShardRecord(site.layer, site.anchor.name, rows, start, stop, group.rank, group.size, products=products)


class _Builder:
    """Inserts nodes before the site's top-k, each with its fake value (later stages and Inductor read them)."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node) -> None:
        from torch._guards import detect_fake_mode

        self.graph, self.anchor = graph, anchor
        self.mode = detect_fake_mode([fake_value(anchor.args[0])])

    def call(self, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
        kwargs = kwargs or {}
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        fake_args, fake_kwargs = fx.map_arg((args, kwargs), lambda n: n.meta["val"])
        if self.mode is not None:
            with self.mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node


def _emit(graph: fx.Graph, site: IndexerSite, cone: _Cone, start: int, stop: int) -> fx.Node:
    """The cone run on rows ``[start, stop)`` and its top-k; returns the local indices."""
    build = _Builder(graph, site.anchor)
    made: dict[tuple[fx.Node, RowAxis], fx.Node] = {}
    order = node_order(graph)
    for node in sorted({*cone.copied, *cone.sliced}, key=order.__getitem__):
        for axis in cone.sliced.get(node, ()):
            made[node, axis] = _slice(build, node, axis, start, stop)
        if node in cone.copied:
            axis, demands = cone.copied[node], cone.inputs[node]

            def local(arg: fx.Node, demands=demands) -> fx.Node:
                wanted = demands.get(arg)
                return arg if wanted is None else made[arg, wanted]

            args, kwargs = fx.map_arg((node.args, node.kwargs), local)
            if is_call(node, _VIEWS) and not args[0].meta["val"].is_contiguous():  # a slice across a merged axis
                args = (build.call(aten.clone.default, (args[0],), {"memory_format": torch.contiguous_format}),
                        *args[1:])
            made[node, axis] = build.call(node.target, sliced_arguments(node, axis, stop - start, args), kwargs)
    score = site.anchor.args[0]
    local_score = made[score, cone.copied[score]]
    topk = build.call(site.anchor.target, (local_score, *site.anchor.args[1:]), dict(site.anchor.kwargs))
    return build.call(operator.getitem, (topk, 1))


def _slice(build: _Builder, node: fx.Node, axis: RowAxis, start: int, stop: int) -> fx.Node:
    """Rows ``[start, stop)`` of a value computed whole: a slice, or where the rows run ``outer`` times along the
    axis (a batch merged before them), the same rows of every run, gathered into one contiguous axis."""
    if axis.outer == 1:
        return build.call(aten.slice.Tensor, (node, axis.axis, start * axis.inner, stop * axis.inner))
    shape = list(fake_value(node).shape)
    runs = [*shape[: axis.axis], axis.outer, shape[axis.axis] // axis.outer, *shape[axis.axis + 1 :]]
    whole = build.call(aten.clone.default, (node,), {"memory_format": torch.contiguous_format})
    rows = build.call(aten.slice.Tensor, (build.call(aten.view.default, (whole, runs)), axis.axis + 1,
                                          start * axis.inner, stop * axis.inner))
    rows = build.call(aten.clone.default, (rows,), {"memory_format": torch.contiguous_format})
    merged = [*shape[: axis.axis], axis.size(stop - start), *shape[axis.axis + 1 :]]
    return build.call(aten.view.default, (rows, merged))


def _all_gather_rows(graph: fx.Graph, site: IndexerSite, local: fx.Node, axis: int, rows: int, mine: int,
                     per: int, group: ShardGroup) -> fx.Node:
    """Every rank's rows of the indices, in rank order, as the original ``[.., rows, k]`` tensor."""
    build = _Builder(graph, site.anchor)
    ndim = fake_value(local).dim()
    dtype = fake_value(site.indices).dtype
    keys = fake_value(site.anchor.args[0]).shape[-1]
    order = [axis, *(d for d in range(ndim) if d != axis)]
    if axis:
        local = build.call(aten.permute.default, (local, order))
    narrow = dtype == torch.int64 and keys < 2**31
    if narrow:
        local = build.call(torch.ops.prims.convert_element_type.default, (local, torch.int32))
    local = build.call(aten.clone.default, (local,), {"memory_format": torch.contiguous_format})
    if mine < per:
        local = build.call(aten.constant_pad_nd.default, (local, [0, 0] * (ndim - 1) + [0, per - mine], 0))
    gathered = build.call(_functional.all_gather_into_tensor.default, (local, group.size, group.name))
    gathered = build.call(_functional.wait_tensor.default, (gathered,))
    gathered = build.call(aten.slice.Tensor, (gathered, 0, 0, rows))
    if narrow:
        gathered = build.call(torch.ops.prims.convert_element_type.default, (gathered, dtype))
    if axis:
        inverse = sorted(range(ndim), key=order.__getitem__)
        gathered = build.call(aten.permute.default, (gathered, inverse))
        gathered = build.call(aten.clone.default, (gathered,), {"memory_format": torch.contiguous_format})
    return gathered
