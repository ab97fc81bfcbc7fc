"""Detect block indexers: a top-k over *key blocks* of a q·k score, whose indices mask attention.

MiniMax-M3's indexer (and the block-sparse kernels it was written for) scores every query against
every key with a small multi-head q·kᵀ, max-pools the scores into blocks of ``block_size`` keys
(``view(..., blocks, block_size).amax(-1)``), boosts the query's local blocks, and keeps the
top-``k`` blocks per head; slots that fall on an empty block (score ``-inf``) are tagged ``-1`` with
the top-k *values*. There is no ReLU, so ``topk.py`` (a DSA lightning indexer) rightly leaves it
alone. What marks this kind instead, all from the graph's structure:

* the top-k reduces the block axis of a max-pool (``amax``/``max`` over the axis right after it)
  whose input splits a key axis into ``(blocks, block_size)``;
* under the pool, through masking, padding, scaling and re-viewing only, lies a product of two
  activations that share an input (q·k; a router or sampler multiplies by a weight);
* the indices (after the ``-1`` tagging) reach a softmax (or its post-grad form ``exp(x − amax(x))``,
  or a fused attention op) through mask-building ops only, with no
  contraction and no other top-k on the way: they select what attention sees. A router's indices
  reach the next softmax only through the expert matmuls; a sampler's never reach one.

The values may be read only to tag empty slots (``indices.masked_fill(values == c, v)`` or the
``where`` form). That tagged tensor is what the site shares, so an S layer takes the F layer's
block selection exactly as its indexer would have returned it (the oracle: the S layer's indexer
returning the F layer's output). Two sites are interchangeable when the selection's shape and
dtype, ``k``, the number of blocks and the block size provably agree (``symbolic.SizeProver``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from ..graph_utils import CONTRACTIONS, VIEW_LIKE, CallWalk, fake_value, getitem_users, is_call
from .graph_inputs import parameter_placeholders
from .layers import module_path
from .registry import register_site_finder
from .sites import CacheWrite, IndexerSite, TopkVerdict
from .topk import (
    _operand_role,
    _product_operands,
    _Role,
    _share_an_input,
    cache_writes_feeding_only,
    topk_arguments,
)

aten = torch.ops.aten

#: Ops allowed between the block scores and the top-k (masking, local-block boosts, casts, views).
#: (In-place forms too: an exported program's pre-dispatch graph keeps ``scatter_`` and ``aten.to``.)
_SCORE_EDITS = VIEW_LIKE | {
    aten.masked_fill, aten.scatter, aten.where, aten.add, aten.sub, aten.mul, aten.div, aten.constant_pad_nd,
    aten.index_put, aten.fill, aten.masked_fill_, aten.scatter_, aten.index_put_, aten.fill_, aten.to, aten.pad,
}
#: Ops allowed between the q·k product and the pool (causal masking, padding to whole blocks, scaling).
_PRODUCT_EDITS = VIEW_LIKE | {
    aten.masked_fill, aten.masked_fill_, aten.where, aten.add, aten.mul, aten.div, aten.constant_pad_nd, aten.to,
    aten.pad,
}
#: Max-pools over a block axis.
_POOLS = {aten.amax, aten.max}
#: What attention's mask ends in.
_ATTENTION = {
    aten._softmax, aten.softmax, aten._safe_softmax, aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention, aten.scaled_dot_product_attention,
    aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_cudnn_attention,
}
#: Comparisons that tag empty slots from the top-k values.
_VALUE_TESTS = {aten.eq, aten.ne, aten.isinf, aten.isneginf, aten.isposinf, aten.lt, aten.le, aten.gt, aten.ge}
_MAX_WALK = 400


@dataclasses.dataclass(eq=False)
class BlockTopkSite(IndexerSite):
    """A block indexer whose selection is ``indices`` (the top-k indices, after any ``-1`` tagging)."""

    blocks: object = None  # number of key blocks scored (the top-k axis)
    block_size: object = None  # keys per block
    values_tag: fx.Node | None = None  # the node that tags empty slots from the values, if any

    kind = "aten.topk over key blocks"

    def refusal(self) -> str | None:
        readers = getitem_users(self.anchor, 1)
        if len(readers) != 1:
            return f"the block indices are read through {len(readers)} getitem nodes"
        return None

    def incompatibility(self, source: IndexerSite, sizes=None) -> str | None:
        sizes = sizes or self.sizes()
        reason = super().incompatibility(source, sizes)
        if reason is not None:
            return reason
        assert isinstance(source, BlockTopkSite)
        _, k, dim, largest, ordered = topk_arguments(self.anchor)
        _, k2, dim2, largest2, ordered2 = topk_arguments(source.anchor)
        if not sizes.same_argument(k, k2):
            return f"k={_shown(k)} blocks differs from layer {source.layer}'s k={_shown(k2)}"
        if largest != largest2 or ordered != ordered2:
            return f"top-k largest/sorted differ from layer {source.layer}'s"
        if not sizes.same_size(self.blocks, source.blocks):
            why = sizes.unproven(self.blocks, source.blocks)
            return (
                f"{self.blocks} key blocks scored, layer {source.layer} scores {source.blocks}, not provably the same"
                + (f": {why}" if why else "")
            )
        if not sizes.same_size(self.block_size, source.block_size):
            return f"blocks of {self.block_size} keys, layer {source.layer}'s of {source.block_size}"
        if (self.values_tag is None) != (source.values_tag is None):
            return f"one of this layer and layer {source.layer} tags empty blocks from the top-k values, the other not"
        return None

    def cache_writes(self) -> list[CacheWrite]:
        """Writes of our index keys into a cache input that only our (now dead) block scoring reads."""
        tests = [user for value in getitem_users(self.anchor, 0) for user in value.users]
        return cache_writes_feeding_only([self.anchor, *self.anchor.users, *tests, self.indices])


def _shown(k) -> str:
    value = fake_value(k) if isinstance(k, fx.Node) else k
    return str(value)


def _pool_under(score: fx.Node, axis: int) -> tuple[fx.Node, object] | None:
    """The max-pool the top-k's score edits, reducing the axis after ``axis``: (pool input, block size)."""
    walk = CallWalk([score], _MAX_WALK)
    for node in walk:
        if is_call(node, _POOLS):
            found = _block_axis(node, axis)
            if found is not None:
                return found
            continue
        if is_call(node, _SCORE_EDITS):
            first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if first is not None:  # the edited tensor; masks and boosts are the other operands
                walk.extend([first])
            if is_call(node, {aten.where}) and len(node.args) > 2:
                walk.extend(a for a in node.args[1:] if isinstance(a, fx.Node))
    return None


def _block_axis(pool: fx.Node, axis: int) -> tuple[fx.Node, object] | None:
    """(pool input, block size) when ``pool`` reduces exactly the dim right after the top-k axis."""
    source = pool.args[0]
    value, pooled = fake_value(source), fake_value(pool)
    if value is None or pooled is None:
        return None
    if is_call(pool, {aten.amax}):
        dims = pool.args[1] if len(pool.args) > 1 else pool.kwargs.get("dim", ())
        keepdim = pool.args[2] if len(pool.args) > 2 else pool.kwargs.get("keepdim", False)
    else:
        if len(pool.args) < 2 or not isinstance(pool.args[1], int):
            return None  # max() over everything pools no block axis
        dims, keepdim = [pool.args[1]], pool.args[2] if len(pool.args) > 2 else False
        if value.dim() == 0:
            return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    if len(dims) != 1 or keepdim or value.dim() != pooled.dim() + 1:
        return None
    reduced = dims[0] % value.dim()
    if reduced != axis % pooled.dim() + 1:
        return None
    return source, value.shape[reduced]


#: What lets the pass rewire a block top-k it found but left alone.
_MASK_ONLY = "the pass rewires a block top-k whose indices (and an empty-block tag) only build attention's mask"


def _product_under_pool(source: fx.Node) -> fx.Node | None:
    """The q·k contraction the pooled scores are an edited, re-viewed copy of."""
    walk = CallWalk([source], _MAX_WALK)
    for node in walk:
        if is_call(node, CONTRACTIONS):
            return node
        if is_call(node, {aten.where}):  # where(mask, fill, scores): the edited tensor is a value branch
            walk.extend(a for a in node.args[1:] if isinstance(a, fx.Node))
        elif is_call(node, _PRODUCT_EDITS) and node.args and isinstance(node.args[0], fx.Node):
            walk.extend([node.args[0]])
    return None


def _selection(topk: fx.Node) -> tuple[fx.Node, fx.Node | None] | str:
    """(the selection consumers read, the value tag or None), or why the values are read otherwise."""
    indices = getitem_users(topk, 1)
    values = [u for u in getitem_users(topk, 0) if u.users]
    if len(indices) != 1:
        return f"the indices are read through {len(indices)} getitem nodes"
    (index,) = indices
    if not values:
        return index, None
    if len(values) != 1:
        return "the top-k values are read through several getitem nodes"
    tests = list(values[0].users)
    if not tests or not all(is_call(t, _VALUE_TESTS) for t in tests):
        return "the top-k values are used beyond tagging empty blocks: sharing only the indices would change them"
    tags = {user for t in tests for user in t.users}
    if len(tags) != 1 or any(len(t.users) != 1 for t in tests):
        return "the test on the top-k values is read beyond tagging the indices"
    (tag,) = tags
    tags_indices = (is_call(tag, {aten.masked_fill}) and tag.args[0] is index and tag.args[1] in tests) or (
        is_call(tag, {aten.where}) and tag.args[0] in tests and index in tag.args[1:]
    )
    if not tags_indices or set(index.users) != {tag}:
        return "the top-k values are used beyond tagging empty blocks: sharing only the indices would change them"
    return tag, tag


def _feeds_attention(selection: fx.Node) -> bool:
    """Whether the selection reaches a softmax (or fused attention) through mask-building ops only."""
    frontier, seen = [selection], {selection}
    while frontier and len(seen) < _MAX_WALK:
        node = frontier.pop()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            if is_call(user, _ATTENTION) or _decomposed_softmax(user):
                return True
            if is_call(user, CONTRACTIONS) or is_call(user, {aten.topk}):
                continue  # past a matmul the path is hidden states, not a mask
            seen.add(user)
            frontier.append(user)
    return False


def _decomposed_softmax(node: fx.Node) -> bool:
    """``exp(x − amax(x))``: a softmax as Inductor's post-grad graph spells it (``aten._softmax`` decomposed)."""
    if not is_call(node, {aten.exp}) or not isinstance(node.args[0], fx.Node) or not is_call(node.args[0], {aten.sub}):
        return False
    shifted, peak = node.args[0].args[:2]
    return isinstance(peak, fx.Node) and is_call(peak, {aten.amax, aten.max}) and peak.args[0] is shifted


def classify_block_topk(node: fx.Node, params: frozenset[fx.Node] | None = None) -> TopkVerdict:
    """Whether one ``aten.topk`` is a block indexer's selection (see the module docstring)."""
    score, _, dim, _, _ = topk_arguments(node)
    score_value = fake_value(score)
    if score_value is None or not isinstance(dim, int):
        return TopkVerdict(node, False, (), "top-k input carries no shape metadata")
    pooled = _pool_under(score, dim % score_value.dim())
    if pooled is None:
        return TopkVerdict(node, False, (), "no max-pool over key blocks under the top-k axis")
    source, block_size = pooled
    product = _product_under_pool(source)
    if product is None:
        return TopkVerdict(node, False, (), "block-pooled score is not a product")
    operands = _product_operands(product)
    roles = [_operand_role(op, params) for op in operands]
    evidence = [f"top-k over blocks of {block_size} keys max-pooled from {product.name}"]
    if _Role.WEIGHT in roles:
        return TopkVerdict(node, False, tuple(evidence), "block score multiplies a weight: not q·k")
    # From here on the score is a pooled product the structure cannot call a projection: a rejection leaves it
    # undecided (a block indexer the pass cannot rewire, or keys of unknown role).
    if _Role.ACTIVATION not in roles or any(role is not _Role.ACTIVATION for role in roles):
        return TopkVerdict(node, False, tuple(evidence), "block score multiplies a graph input of unknown role",
                           undecided=True)
    if len(operands) != 2 or not _share_an_input(*operands):
        reason = "block score multiplies tensors from disjoint inputs: not provably q·k"
        return TopkVerdict(node, False, tuple(evidence), reason, undecided=True)
    evidence.append("score is a product of two activations (q·k)")
    selection = _selection(node)
    if isinstance(selection, str):
        return TopkVerdict(node, False, tuple(evidence), f"block top-k left alone: {selection}", undecided=True,
                           remedy=_MASK_ONLY)
    if not _feeds_attention(selection[0]):
        return TopkVerdict(node, False, tuple(evidence), "block top-k whose indices do not reach attention's softmax",
                           undecided=True, remedy=_MASK_ONLY)
    evidence.append("the block indices mask attention (reach a softmax through mask-building ops only)")
    return TopkVerdict(node, True, tuple(evidence), "")


def find_block_topk_sites(graph: fx.Graph) -> tuple[list[IndexerSite], list[TopkVerdict]]:
    """Every block-indexer top-k in ``graph``; the other top-k are ``topk.py``'s to report."""
    sites: list[IndexerSite] = []
    params = parameter_placeholders(graph)
    for node in graph.nodes:
        if not is_call(node, {aten.topk}):
            continue
        verdict = classify_block_topk(node, params)
        if not verdict.is_indexer:
            continue
        found = _selection(node)
        if isinstance(found, str):  # classify_block_topk refuses these already
            continue
        selection, tag = found
        score, _, dim, _, _ = topk_arguments(node)
        blocks = fake_value(score).shape[dim]
        _, block_size = _pool_under(score, dim % fake_value(score).dim())
        sites.append(
            BlockTopkSite(node, selection, module_path(node), verdict.evidence, blocks=blocks,
                          block_size=block_size, values_tag=tag)
        )
    return sites, []


register_site_finder("aten.topk over key blocks", find_block_topk_sites)
