"""Swap an F layer's indexer scoring for the fused Triton kernel (``fx_indexcache::indexer_logits``).

After the IndexCache rewrite, each remaining indexer site is an ``aten.topk`` whose input is

    X[b, s, t] = sum_h  w[b, s, h] * relu(c * sum_d q[b, s, h, d] * k[b, t, d])

written any way a model writes it: batched ``[B, S, T]`` or unbatched ``[S, T]`` (no b), the head axis
anywhere in the intermediate (``[S, H, T]``, ``[H, S, T]``, ``[B, S, T, H]``, ...), k a whole cache
buffer, a slice or a gather of it (any such op is a *leaf*: the kernel reads its value), with or
without unit axes, q/k/w upcast to fp32 before the products, the products as ``bmm``/``mm`` (what einsum
and matmul lower to) or broadcast ``mul`` + ``sum``, and fp32 scalar factors anywhere (on q, on k,
between product and ReLU, after the ReLU, on the weights or on the score: all fold into ``c``;
those after the ReLU must be >= 0). The mask (``where`` / ``masked_fill`` / an additive mask) under the
top-k stays in the graph exactly as written. This module finds ``X`` (the unmasked score), recovers
the leaves ``q``, ``k`` and ``w`` and replaces ``X`` by one ``indexer_logits(q', k', w', causal=False,
scale=c)`` call on the leaves re-viewed as ``[B, S, H, D]``, ``[B, T, D]``, ``[B, S, H]`` (unit axes
added where a role is absent), re-viewed back to ``X``'s own layout. Each site gets a ``FusionRecord``.
Where nothing but the top-k's indices reads the score (``fused_topk_site``), the score, its mask and the top-k
become one ``indexer_topk_fused`` call instead: scored and selected without writing the logits.

Matching is proof-carrying, not by shape guess: each leaf dimension gets an index label, every
view / permute / expand / reshape between the leaves and ``X`` is replayed on those labels (a
reshape may only merge groups of whole labels; a leaf whose chain splits an axis is moved past the
split), each product unifies the labels it pairs (batch and contracted axes) and records what it
sums over. The roles are then read off the labels: d is the one axis the inner product sums, h the
one the weighted sum sums, q is the product operand that carries h, and each axis of ``X`` is b (in q
and k), s (q only) or t (k only). The rewrite is made only when every non-unit leaf axis plays exactly
one allowed role (q: b s h d, k: b t d, w: b s h), no leaf is broadcast along a role it needs, the
summed axes are real, and every product, factor and cast between the leaves and the score is in
fp16/bf16/fp32/fp64. Anything else (an op the replay does not know, a cast to another type, a negative
factor after the ReLU, a diagonal, a broadcast that is summed over) leaves the site untouched, and
its record says why.

Numerics contract (``FusionRecord.numerics``): ``EXACT`` where the graph computes the score in fp32 (rounded,
if at all, only at the score itself); ``FP32_INSIDE`` where it rounds intermediates to bf16/fp16 (a bf16
``einsum``, a head sum in bf16, a narrowing cast between the products): the kernel keeps them in fp32 and
rounds only the score, to the dtype the graph stores it in -- what Inductor does with the low-precision ops it
fuses (``emulate_precision_casts=False``, its default; with ``True`` such sites are refused). A bf16/fp16
score becomes ``indexer_logits_rounded`` (the kernel's store rounds to nearest even); the leaves' own
roundings stay in the graph (a leaf chain ends at a narrowing cast or a bf16 factor). The top-k of a
bf16/fp16 score reads it widened to fp32 (exact), so our top-k kernels take it.

Rounding: the models cast bf16 q and k to fp32 before the product; the kernel reads the bf16
tensors before those casts (``q'``/``k'`` are the tensors ahead of the casts), multiplies them on the
tensor cores and accumulates in fp32. bf16 x bf16 products are exact in fp32, so against the model's
own (eager) semantics only the accumulation order of the d- and h-sums changes: measured relative
norm error 7e-6 (T=8K) to 1.7e-5 (T=32K) on an H100 at V3.2 indexer dims. Against Inductor's default
code the difference is ~1.2e-3, because Inductor (``emulate_precision_casts=False``) fuses RoPE, the
cast to bf16 and the cast back and skips that rounding; with ``emulate_precision_casts=True`` it
agrees with the fused path to 7e-6 as well. Top-k sets then agree except at near-ties (keys within
 ~1e-3 x max|score| of the K-th score). See docs/kernels.md; bf16/fp16 scores: docs/kernels_bf16.md.

With ``precision="fp8"`` (the config's ``indexer_precision``) the score goes to ``indexer_logits_fp8`` instead
(``kernels.indexer_fp8``: e4m3 q and k with per-row scales), where ``fp8_refusal`` admits the leaves; that op
changes the scores by e4m3's rounding (~4 %), so it is never chosen unless asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Sequence

import sympy
import torch
from torch import fx

from ..detection.sort_topk import is_sort, leading_cut, sort_arguments
from ..detection.topk import topk_arguments
from ..graph_utils import (
    CASTS,
    EXPANDS,
    IDENTITIES,
    PERMUTES,
    RESHAPES,
    VALUE_PRESERVING,
    dead_if_removed,
    erase_dead,
    fake_mode_of,
    fake_value,
    insertions_undone_on_error,
    is_call,
    is_relu,
    packet,
    relu_input,
    same_size,
    take_provenance,
)

aten = torch.ops.aten
prims = torch.ops.prims

logger = logging.getLogger(__name__)

__all__ = [
    "EXACT",
    "FP32_INSIDE",
    "FusionRecord",
    "ScoreMatch",
    "kernel_refusal",
    "match_indexer_score",
    "substitute_fused_indexer",
]

_WIDE = (torch.float32, torch.float64)
#: Low-precision float dtypes a graph may compute the score in: the compiler computes them in fp32 and rounds
#: where it stores a tensor (Inductor, ``emulate_precision_casts=False``); the kernel does the same.
_NARROW = (torch.bfloat16, torch.float16)
_FLOATS = _WIDE + _NARROW
#: ``FusionRecord.numerics``: the site's own math is fp32 (the kernel reproduces it to fp32 accumulation order,
#: and rounds the score once where the graph rounds it, if it does).
EXACT = "exact"
#: ``FusionRecord.numerics``: the graph rounds some intermediate of the score to bf16/fp16 (a bf16 product, a
#: head sum in bf16, ...); the kernel keeps every intermediate in fp32 and rounds only the score, to the graph's
#: dtype where the graph stores it -- Inductor's own contract for low-precision ops it fuses.
FP32_INSIDE = "fp32_inside"
_MASKS = {aten.where, aten.masked_fill, aten.add, aten.sub, aten.mul}
_MAX_CHAIN = 48
#: How many mask ops / views between the top-k input and the score the candidate search walks through.
_MAX_MASK_DEPTH = 3


class _NoMatch(Exception):
    """The scoring subgraph is not (provably) the indexer score; the message says why."""


class _Split(_NoMatch):
    """A reshape splits one label into several (the replay only regroups whole labels)."""


# ----------------------------------------------------------------------------------------------
# Label algebra
# ----------------------------------------------------------------------------------------------


def _sym(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


class _Labels:
    """Atoms (index variables with a size) and a union-find saying which atoms are one index."""

    def __init__(self) -> None:
        self.size: list[sympy.Expr] = []
        self.parent: list[int] = []
        self.origin: list[str] = []  # "leaf" or "broadcast"

    def new(self, size: sympy.Expr, origin: str) -> int:
        self.size.append(size)
        self.parent.append(len(self.parent))
        self.origin.append(origin)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def unify(self, a: int, b: int) -> None:
        if not same_size(self.size[a], self.size[b]):
            raise _NoMatch("paired axes differ in size")
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


@dataclasses.dataclass
class _Tracked:
    """A tensor of the scoring subgraph: per dimension, the atoms it flattens (unit atoms omitted)."""

    dims: list[list[int]]
    shape: tuple  # sympy sizes


def _shape(node: fx.Node) -> tuple:
    value = fake_value(node)
    if not isinstance(value, torch.Tensor):
        raise _NoMatch(f"{node.name} carries no tensor metadata")
    return tuple(_sym(s) for s in value.shape)


def _leaf(labels: _Labels, node: fx.Node) -> _Tracked:
    shape = _shape(node)
    dims = [[] if same_size(s, sympy.Integer(1)) else [labels.new(s, "leaf")] for s in shape]
    return _Tracked(dims, shape)


def _regroup(labels: _Labels, tracked: _Tracked, out_shape: tuple) -> _Tracked:
    """Row-major reshape on labels: each output dim takes whole atoms, in order."""
    atoms = [a for dim in tracked.dims for a in dim]
    dims, i = [], 0
    for size in out_shape:
        if same_size(size, sympy.Integer(1)):
            dims.append([])
            continue
        group, prod = [], sympy.Integer(1)
        while i < len(atoms) and not same_size(prod, size):
            group.append(atoms[i])
            prod = prod * labels.size[atoms[i]]
            i += 1
        if not same_size(prod, size):
            raise _Split("a reshape splits an axis of q, k or w")
        dims.append(group)
    if i != len(atoms):
        raise _Split("a reshape splits an axis of q, k or w")
    return _Tracked(dims, tuple(out_shape))


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _replay(labels: _Labels, node: fx.Node, tracked: _Tracked) -> _Tracked:
    """Apply one chain op to the labels of its (only) tensor input."""
    op = packet(node)
    out_shape = _shape(node)
    if op in RESHAPES:
        return _regroup(labels, tracked, out_shape)
    if op in IDENTITIES:
        return _Tracked(list(tracked.dims), out_shape)
    if op in CASTS:
        src, dst = fake_value(node.args[0]), fake_value(node)
        if src.dtype not in _FLOATS or dst.dtype not in _FLOATS:
            raise _NoMatch(f"{node.name} casts {src.dtype} to {dst.dtype} (only casts among fp16/bf16/fp32/fp64 "
                           "are replayed)")
        if op is aten._to_copy and set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}:
            raise _NoMatch(f"{node.name}: _to_copy with unexpected arguments")
        if op is aten._to_copy and dst.device != src.device:
            raise _NoMatch(f"{node.name} moves the tensor to another device")
        return _Tracked(list(tracked.dims), out_shape)
    if op in PERMUTES:
        n = len(tracked.dims)
        if op is aten.permute:
            perm = [_norm_dim(d, n) for d in node.args[1]]
        elif op is aten.t:
            perm = list(range(n))[::-1]
        else:
            a, b = _norm_dim(node.args[1], n), _norm_dim(node.args[2], n)
            perm = list(range(n))
            perm[a], perm[b] = perm[b], perm[a]
        return _Tracked([list(tracked.dims[p]) for p in perm], out_shape)
    if op in EXPANDS:
        n_new = len(out_shape) - len(tracked.dims)
        if n_new < 0:
            raise _NoMatch("expand drops dims")
        dims = []
        for j, size in enumerate(out_shape):
            i = j - n_new
            if i < 0 or (same_size(tracked.shape[i], sympy.Integer(1)) and not same_size(size, sympy.Integer(1))):
                dims.append([] if same_size(size, sympy.Integer(1)) else [labels.new(size, "broadcast")])
            else:
                dims.append(list(tracked.dims[i]))
        return _Tracked(dims, out_shape)
    raise _NoMatch(f"{node.name}: {op} is not a view the matcher replays")


def _align(labels: _Labels, a: Sequence[int], b: Sequence[int]) -> None:
    if len(a) != len(b):
        raise _NoMatch("a product pairs axes grouped differently")
    for x, y in zip(a, b):
        labels.unify(x, y)


# ----------------------------------------------------------------------------------------------
# Structural walk: X <- views <- outer product <- (views <- relu <- scaled views <- inner product)
# ----------------------------------------------------------------------------------------------


def _dtype(node: fx.Node):
    value = fake_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def _is_wide(node: fx.Node) -> bool:
    return _dtype(node) in _WIDE


def _is_narrowing_cast(node: fx.Node) -> bool:
    """A float cast to fewer bits (fp32 -> bf16, ...): it rounds."""
    if not is_call(node, CASTS) or not isinstance(node.args[0], fx.Node):
        return False
    src, dst = _dtype(node.args[0]), _dtype(node)
    return src in _FLOATS and dst in _FLOATS and dst.itemsize < src.itemsize


def _scalar_factor(node: fx.Node, narrow_ok: bool = False) -> float | None:
    """For ``mul(x, c)`` / ``div(x, c)`` with a Python number ``c``: the factor on x.

    On a leaf's chain (``narrow_ok`` False) the factor must be computed in fp32/fp64: a factor applied to q,
    k or w in bf16/fp16 rounds that operand, so such a node is not a factor (it ends the chain and becomes
    the leaf, read by the kernel as the graph rounded it). Between the q.k product and the score
    (``narrow_ok``) a bf16/fp16 factor is computed in fp32 by the compiler and folded like any other.
    """
    op = packet(node)
    allowed = _FLOATS if narrow_ok else _WIDE
    if op not in (aten.mul, aten.div) or len(node.args) != 2 or node.kwargs or _dtype(node) not in allowed:
        return None
    c = node.args[1]
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        return None
    if op is aten.div:
        return None if c == 0 else 1.0 / float(c)
    return float(c)


def _chain_back(node: fx.Node, narrow_ok: bool = False) -> tuple[fx.Node, list[fx.Node]]:
    """Walk up through chain ops and scalar factors; return the first other node and the chain.

    ``narrow_ok`` False (a leaf's chain): only fp32/fp64 factors, and a narrowing cast ends the chain (the
    rounded tensor is the leaf the kernel reads). True (between the q.k product and the score): bf16/fp16
    factors and narrowing casts are part of the chain (roundings the fused kernel leaves out, see ``EXACT``).
    """
    chain = []
    while isinstance(node, fx.Node) and node.op == "call_function" and len(chain) < _MAX_CHAIN:
        if not narrow_ok and _is_narrowing_cast(node):
            break
        if packet(node) in VALUE_PRESERVING or _scalar_factor(node, narrow_ok) is not None:
            chain.append(node)
            node = node.args[0]
            continue
        break
    return node, chain[::-1]  # forward order


def _product_parts(node: fx.Node):
    """``(kind, a, b, reduced_dims, keepdim, mul)`` for bmm/mm or sum/mean(mul(a, b)); None otherwise. A sum may
    accumulate in float32 (``dtype=torch.float32``: what the kernel does anyway); any other ``dtype`` casts each
    product before the sum, so it is not read as one. A mean is the sum and a positive factor (``_mean_factor``)."""
    if is_call(node, {aten.bmm, aten.mm}):
        return ("bmm" if packet(node) is aten.bmm else "mm", node.args[0], node.args[1], None, False, None)
    if is_call(node, {aten.sum, aten.mean}) and node.target not in (aten.sum.default, aten.mean.default):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if node.kwargs.get("dtype") not in (None, torch.float32) or not dims:
            return None
        mul = node.args[0]
        if is_call(mul, {aten.mul}) and len(mul.args) == 2 and all(isinstance(a, fx.Node) for a in mul.args):
            kind = "mean" if is_call(node, {aten.mean}) else "sum"
            return (kind, mul.args[0], mul.args[1], list(dims), bool(keepdim), mul)
    return None


def _mean_factor(parts) -> float:
    """1 / (the number of values a mean averages), 1.0 for any other product; refused where that number is not
    known at compile time (the kernel folds the factor into its scale)."""
    kind, _, _, dims, _, mul = parts
    if kind != "mean":
        return 1.0
    shape = _shape(mul)
    count = 1
    for d in dims:
        size = shape[_norm_dim(d, len(shape))]
        if not isinstance(size, (int, sympy.Integer)) or int(size) < 1:
            raise _NoMatch(f"{mul.name}: a mean over an axis of size {size}, not a known count")
        count *= int(size)
    return 1.0 / count


def _combine(labels: _Labels, parts, ta: _Tracked, tb: _Tracked, out: fx.Node) -> tuple[_Tracked, list[int]]:
    """Labels of a product's result and the atoms it sums over."""
    kind, _, _, dims, keepdim, mul = parts
    if kind == "bmm":
        if len(ta.dims) != 3 or len(tb.dims) != 3:
            raise _NoMatch("bmm operands are not 3-D")
        _align(labels, ta.dims[0], tb.dims[0])
        _align(labels, ta.dims[2], tb.dims[1])
        result = _Tracked([list(ta.dims[0]), list(ta.dims[1]), list(tb.dims[2])], _shape(out))
        return result, list(ta.dims[2])
    if kind == "mm":
        if len(ta.dims) != 2 or len(tb.dims) != 2:
            raise _NoMatch("mm operands are not 2-D")
        _align(labels, ta.dims[1], tb.dims[0])
        return _Tracked([list(ta.dims[0]), list(tb.dims[1])], _shape(out)), list(ta.dims[1])
    # sum(mul(a, b), dims): broadcasting mul, then a reduction
    n = max(len(ta.dims), len(tb.dims))
    pa = [[]] * (n - len(ta.dims)) + ta.dims
    pb = [[]] * (n - len(tb.dims)) + tb.dims
    sa = (sympy.Integer(1),) * (n - len(ta.shape)) + ta.shape
    sb = (sympy.Integer(1),) * (n - len(tb.shape)) + tb.shape
    prod_dims = []
    for da, db, xa, xb in zip(pa, pb, sa, sb):
        if same_size(xa, sympy.Integer(1)):
            prod_dims.append(list(db))
        elif same_size(xb, sympy.Integer(1)):
            prod_dims.append(list(da))
        else:
            _align(labels, da, db)
            prod_dims.append(list(da))
    red = sorted({_norm_dim(d, n) for d in dims})
    summed = [a for d in red for a in prod_dims[d]]
    kept = [([] if d in red else prod_dims[d]) for d in range(n) if keepdim or d not in red]
    return _Tracked(kept, _shape(out)), summed


@dataclasses.dataclass
class ScoreMatch:
    """A proven indexer score: ``score`` = sum_h w * relu(scale * q.k) over the leaves' roles.

    ``*_roles`` give, per leaf dimension, its role letter (``b s h d`` for q, ``b t d`` for k,
    ``b s h`` for w; ``b`` may be absent: an unbatched model) or ``"1"`` for a unit dimension that
    plays none; ``score_roles`` the same for the score's own dimensions (``b s t`` in some order).
    """

    score: fx.Node
    q: fx.Node
    k: fx.Node
    w: fx.Node
    q_roles: tuple[str, ...]
    k_roles: tuple[str, ...]
    w_roles: tuple[str, ...]
    score_roles: tuple[str, ...]
    scale: float
    score_dtype: torch.dtype = torch.float32  # what the graph stores the score as; the fused op returns it
    numerics: str = EXACT  # EXACT or FP32_INSIDE (module constants)


@dataclasses.dataclass
class _Scale:
    """The scalar factors met on the way: ``pre`` before the ReLU (any sign), ``post`` after it (each >= 0)."""

    pre: float = 1.0
    post: float = 1.0

    def total(self) -> float:
        value = self.pre * self.post
        if not (math.isfinite(value) and value >= 0.0):
            raise _NoMatch(f"scale {value} before the ReLU is not a finite non-negative number")
        return value


def _replay_chain(labels: _Labels, chain: list[fx.Node], tracked: _Tracked, scale: _Scale, post: bool,
                  narrow_ok: bool = False) -> _Tracked:
    """Replay ``chain`` on ``tracked``'s labels, folding scalar factors into ``scale``."""
    for node in chain:
        factor = _scalar_factor(node, narrow_ok)
        if factor is None:
            tracked = _replay(labels, node, tracked)
        elif post:
            if not factor >= 0.0:
                raise _NoMatch(f"{node.name} scales the ReLU'd score by {factor} (< 0)")
            scale.post *= factor
        else:
            scale.pre *= factor
    return tracked


def _settle_leaf(leaf: fx.Node, chain: list[fx.Node]) -> tuple[fx.Node, list[fx.Node]]:
    """Move the leaf down its chain past every reshape that splits one of its axes.

    A leaf is an opaque tensor the kernel reads as it is, so any node of the chain may serve as the
    leaf; taking a later one only keeps the replay to whole-label regrouping (e.g. the ``view`` of a
    projection's ``[B*S, H*D]`` output as ``[B, S, H, D]`` becomes the leaf, not the ``mm``).
    """
    while True:
        labels, tracked = _Labels(), None
        try:
            tracked = _leaf(labels, leaf)
            for i, node in enumerate(chain):
                if _scalar_factor(node) is None:
                    tracked = _replay(labels, node, tracked)
            return leaf, chain
        except _Split:
            leaf, chain = chain[i], chain[i + 1:]


#: The dtypes the fused ops return a score in (fp32: ``indexer_logits``; bf16/fp16: ``indexer_logits_rounded``).
_SCORE_DTYPES = (torch.float32,) + _NARROW


def _score_value(x: fx.Node) -> torch.Tensor:
    value = fake_value(x)
    if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3):
        raise _NoMatch("the score is not a 2-D [S, T] or 3-D [B, S, T] tensor")
    if value.dtype not in _SCORE_DTYPES:
        raise _NoMatch(f"the score is {value.dtype}; the kernel writes float32, bfloat16 or float16")
    return value


def _outer_sides(outer: fx.Node, parts):
    """``(relu, relu_chain, w_leaf, w_chain, relu_is_first)`` of the head-weighted sum."""
    sides = [_chain_back(operand, narrow_ok=True) for operand in parts[1:3]]
    relu_sides = [i for i, (root, _) in enumerate(sides) if is_relu(root)]
    if len(relu_sides) != 1:
        raise _NoMatch("the head-weighted sum does not weight exactly one ReLU")
    ri = relu_sides[0]
    relu, relu_chain = sides[ri]
    w_leaf, w_chain = _chain_back(parts[1:3][1 - ri])  # w is a leaf: its own bf16 roundings stay in the graph
    return relu, relu_chain, w_leaf, w_chain, ri == 0


def _require_float(node: fx.Node, what: str) -> None:
    dtype = _dtype(node)
    if dtype not in _FLOATS:
        raise _NoMatch(f"{what} is computed in {dtype}; the kernel computes fp16/bf16/fp32 scores in fp32")


def _computes(node: fx.Node) -> bool:
    """Whether a chain node computes new values (a scalar factor or a cast) rather than moving them."""
    return _scalar_factor(node, narrow_ok=True) is not None or is_call(node, CASTS)


def _numerics(x: fx.Node, inner: fx.Node, inner_parts, pre_chain, relu_chain, outer: fx.Node, outer_parts,
              x_chain) -> str:
    """EXACT when the graph rounds nothing between the q.k product and the score but, at most, the score
    itself (its last computing node, to the score's dtype: the rounded op rounds there too); else FP32_INSIDE.
    A sum that widens as it accumulates (``dtype=torch.float32``) counts its products' rounding too."""
    computing = [*_product_nodes(inner, inner_parts), *filter(_computes, pre_chain), *filter(_computes, relu_chain),
                 *_product_nodes(outer, outer_parts), *filter(_computes, x_chain)]
    rounding = [n for n in computing if _dtype(n) in _NARROW]
    if not rounding or (rounding == [computing[-1]] and _dtype(computing[-1]) == _dtype(x)):
        return EXACT
    return FP32_INSIDE


def _product_nodes(product: fx.Node, parts) -> list[fx.Node]:
    """The nodes that round a product's values: the product, and its mul too where its sum widens the dtype."""
    *_, mul = parts
    return [mul, product] if mul is not None and _dtype(mul) != _dtype(product) else [product]


def _match_at(x: fx.Node) -> ScoreMatch:
    _score_value(x)
    outer, x_chain = _chain_back(x, narrow_ok=True)
    outer_parts = _product_parts(outer)
    if outer_parts is None:
        raise _NoMatch(f"the score comes from {outer.name} ({outer.target}), not a head-weighted sum")
    _require_float(outer, "the head-weighted sum")
    relu, relu_chain, w_leaf, w_chain, relu_first = _outer_sides(outer, outer_parts)
    inner, pre_chain = _chain_back(relu_input(relu), narrow_ok=True)
    inner_parts = _product_parts(inner)
    if inner_parts is None:
        raise _NoMatch(f"the ReLU's input comes from {inner.name} ({inner.target}), not a q.k product")
    _require_float(inner, "the q.k product")
    (qa, qa_chain), (kb, kb_chain) = (_settle_leaf(*_chain_back(o)) for o in inner_parts[1:3])
    w_leaf, w_chain = _settle_leaf(w_leaf, w_chain)
    leaves = [qa, kb, w_leaf]
    if len({id(n) for n in leaves}) != 3:
        raise _NoMatch("q, k and w are not three distinct tensors")

    labels, scale = _Labels(), _Scale()
    t_a, t_b, t_w = _leaf(labels, qa), _leaf(labels, kb), _leaf(labels, w_leaf)
    leaf_dims = [list(t.dims) for t in (t_a, t_b, t_w)]
    t_a = _replay_chain(labels, qa_chain, t_a, scale, post=False)
    t_b = _replay_chain(labels, kb_chain, t_b, scale, post=False)
    scale.pre *= _mean_factor(inner_parts)
    scale.post *= _mean_factor(outer_parts)
    prod, inner_sum = _combine(labels, inner_parts, t_a, t_b, inner)
    prod = _replay_chain(labels, pre_chain, prod, scale, post=False, narrow_ok=True)
    r = _replay_chain(labels, relu_chain, _Tracked(prod.dims, _shape(relu)), scale, post=True, narrow_ok=True)
    t_w = _replay_chain(labels, w_chain, t_w, scale, post=True)
    score, outer_sum = _combine(labels, outer_parts, *((r, t_w) if relu_first else (t_w, r)), outer)
    score = _replay_chain(labels, x_chain, score, scale, post=True, narrow_ok=True)
    roles = _prove_roles(labels, inner_sum, outer_sum, score, leaf_dims)
    swap = roles.pop("swap")
    q_node, k_node = (kb, qa) if swap else (qa, kb)
    return ScoreMatch(x, q_node, k_node, w_leaf, roles["q"], roles["k"], roles["w"], roles["score"], scale.total(),
                      _dtype(x), _numerics(x, inner, inner_parts, pre_chain, relu_chain, outer, outer_parts, x_chain))


def _prove_roles(labels: _Labels, inner_sum, outer_sum, score: _Tracked, leaf_dims) -> dict:
    """Role letters per leaf dimension, read off the labels (never off positions or sizes).

    d: the one axis the q.k product sums; h: the one axis the weighted sum sums; q: the product
    operand that carries h; then over the score's axes, b is in q and k, s in q only, t in k only.
    """
    cls = labels.find
    d, h = _summed_axes(cls, inner_sum, outer_sum)
    classes = [{cls(a) for dim in dims for a in dim} for dims in leaf_dims]
    if (h in classes[0]) == (h in classes[1]):
        where = "both q and k" if h in classes[0] else "neither q nor k (q is broadcast over the heads)"
        raise _NoMatch(f"cannot tell q from k: the head axis is on {where}")
    swap = h in classes[1]
    q_cls, k_cls = (classes[1], classes[0]) if swap else (classes[0], classes[1])
    roles = {d: "d", h: "h"}
    score_roles = _score_axis_roles(cls, score, q_cls, k_cls, roles)
    first, second = leaf_dims[:2] if not swap else leaf_dims[1::-1]
    out = {"q": _role_tuple(cls, roles, first, "bshd", "q"), "k": _role_tuple(cls, roles, second, "btd", "k"),
           "w": _role_tuple(cls, roles, leaf_dims[2], "bsh", "w"), "score": tuple(score_roles), "swap": swap}
    present = {r for r in roles.values()}
    for what, needed in (("q", "bshd"), ("k", "btd"), ("w", "bsh")):
        for role in needed:
            if role in present and role not in out[what]:
                raise _NoMatch(f"{what} is broadcast along its {role} axis")
    # broadcast atoms may pair with real ones, but a summed axis must be real on both sides
    for c in (h, d):
        if not any(labels.origin[a] == "leaf" and cls(a) == c for a in range(len(labels.parent))):
            raise _NoMatch("a summed axis is a broadcast")
    return out


def _summed_axes(cls, inner_sum, outer_sum) -> tuple:
    """(d, h): the label the q.k product sums and the one the head-weighted sum sums, each exactly one."""
    d_set, h_set = {cls(a) for a in inner_sum}, {cls(a) for a in outer_sum}
    if len(d_set) != 1 or len(inner_sum) != 1:
        raise _NoMatch("the q.k product does not sum over exactly one axis")
    if len(h_set) != 1 or len(outer_sum) != 1:
        raise _NoMatch("the weighted sum does not sum over exactly one (head) axis")
    (d,), (h,) = d_set, h_set
    if d == h:
        raise _NoMatch("two roles share one axis (a diagonal)")
    return d, h


def _score_axis_roles(cls, score: _Tracked, q_cls: set, k_cls: set, roles: dict) -> list[str]:
    """Each score axis's role (b in q and k, s in q only, t in k only, "1" a unit axis); adds them to ``roles``."""
    score_roles = []
    for dim in score.dims:
        if len(dim) > 1:
            raise _NoMatch("a score axis merges several axes")
        if not dim:
            score_roles.append("1")
            continue
        c = cls(dim[0])
        role = "b" if c in q_cls and c in k_cls else "s" if c in q_cls else "t" if c in k_cls else None
        if role is None or c in roles:
            raise _NoMatch("a score axis is neither a batch, query nor key axis of q and k")
        roles[c] = role
        score_roles.append(role)
    if len(set(roles.values())) != len(roles):
        raise _NoMatch("two score axes play one role")
    return score_roles


def _role_tuple(cls, roles: dict, dims, needed: str, what: str) -> tuple[str, ...]:
    """The role of each of a leaf's dimensions, each one of ``needed`` (or "1"), none used twice."""
    got = []
    for dim in dims:
        role = roles.get(cls(dim[0])) if dim else "1"
        if role is None or (role != "1" and role not in needed):
            raise _NoMatch(f"an axis of {what} plays no role of {needed!r}")
        got.append(role)
    real = [g for g in got if g != "1"]
    if len(set(real)) != len(real):
        raise _NoMatch(f"{what} uses one role on two axes")
    return tuple(got)


def _score_candidates(topk_input: fx.Node) -> list[fx.Node]:
    """The top-k input and, through mask ops and views, the earlier 2-D/3-D fp32/bf16/fp16 tensors it is made of."""
    found, frontier = [topk_input], [topk_input]
    for _ in range(_MAX_MASK_DEPTH):
        nxt = []
        for node in frontier:
            if not (is_call(node, _MASKS) or is_call(node, VALUE_PRESERVING)):
                continue
            for arg in node.all_input_nodes:
                value = fake_value(arg)
                is_score = isinstance(value, torch.Tensor) and value.dim() in (2, 3) and value.dtype in _SCORE_DTYPES
                if is_score and arg not in found:
                    found.append(arg)
                    nxt.append(arg)
        frontier = nxt
    return found


def match_indexer_score(site) -> ScoreMatch | str:
    """The proven score under ``site``'s selection (a site, or an ``aten.topk`` / sort node), or why not."""
    anchor = getattr(site, "anchor", site)
    if not (is_call(anchor, {aten.topk}) or is_sort(anchor)):
        return f"{anchor.name} is not an aten.topk or a sort"
    reasons = []
    for cand in _score_candidates(anchor.args[0]):
        try:
            return _match_at(cand)
        except _NoMatch as e:
            reasons.append(f"{cand.name}: {e}")
        except Exception as e:  # an unexpected graph form: never let matching break compilation
            reasons.append(f"{cand.name}: matcher error {type(e).__name__}: {e}")
    return "no fused-kernel score shape: " + "; ".join(reasons)


# ----------------------------------------------------------------------------------------------
# Rewrite
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FusionRecord:
    """What the substitution did at one indexer site: fused, or left as is and why.

    ``precision``: how the fused op scores ("bf16": the exact kernel; "fp8": ``indexer_logits_fp8``).
    ``fp8_refusal``: fp8 was asked for but the fp8 kernel cannot take this site (the bf16 kernel runs).
    ``numerics`` (fused sites): the contract the fused score keeps -- ``EXACT`` (the graph's own fp32 math, to
    fp32 accumulation order) or ``FP32_INSIDE`` (the graph rounds intermediates to bf16/fp16; the kernel
    keeps them in fp32 and rounds only the score, as Inductor does for the low-precision ops it fuses).
    ``score_dtype``: the dtype the graph stores the score in, which the fused op returns (rounded to
    nearest even from fp32 where it is bf16/fp16).
    ``topk_fused``: the site runs ``indexer_topk_fused`` (score and top-k in one op, no logits written: only the
    indices were read); else the scoring op above and a separate top-k, and ``detail`` says why not fused.
    """

    site: str  # "layer 3", or the top-k node's name where the layer is unknown
    layer: int | None
    fused: bool
    detail: str  # fused: the leaves and scale; not fused: the reason
    precision: str = "bf16"
    fp8_refusal: str | None = None
    numerics: str | None = None
    score_dtype: str | None = None  # "float32", "bfloat16", "float16"
    topk_fused: bool = False

    def note(self) -> str:
        if self.fused:
            op = ("indexer_topk_fused" if self.topk_fused else "indexer_logits_fp8" if self.precision == "fp8" else
                  "indexer_logits_rounded" if self.score_dtype in ("bfloat16", "float16") else "indexer_logits")
            numerics = _NUMERICS_NOTE.get(self.numerics, self.numerics)
            return f"{self.site}: fused {op} ({self.detail}; numerics: {numerics})"
        return f"{self.site}: left as is: {self.detail}"


_NUMERICS_NOTE = {
    EXACT: "exact (the graph's own fp32 math)",
    FP32_INSIDE: "fp32 inside, rounded to the score's dtype where the graph stores it (Inductor's contract)",
}


def _call(graph: fx.Graph, target, args: tuple, fake_args: tuple, mode) -> fx.Node:
    node = graph.call_function(target, args)
    with mode:
        node.meta["val"] = target(*fake_args)
    return node


def _canonical_steps(roles: tuple[str, ...], order: str) -> list[tuple]:
    """(op, extra args) steps that re-view a leaf with per-dim ``roles`` as ``[order...]``."""
    steps = []
    units = [i for i, r in enumerate(roles) if r == "1"]
    kept = [r for r in roles if r != "1"]
    if units:
        steps.append((aten.squeeze.dims, (units,)))
    perm = [kept.index(r) for r in order if r in kept]
    if perm != list(range(len(perm))):
        steps.append((aten.permute.default, (perm,)))
    for i, r in enumerate(order):
        if r not in kept:
            steps.append((aten.unsqueeze.default, (i,)))
    return steps


def _restore_steps(order: str, roles: tuple[str, ...]) -> list[tuple]:
    """The inverse re-view: from ``[order...]`` (unit sizes where a role is absent) to per-dim ``roles``."""
    kept = [r for r in roles if r != "1"]
    steps = []
    absent = [i for i, r in enumerate(order) if r not in kept]
    if absent:
        steps.append((aten.squeeze.dims, (absent,)))
    remaining = [r for r in order if r in kept]
    perm = [remaining.index(r) for r in kept]
    if perm != list(range(len(perm))):
        steps.append((aten.permute.default, (perm,)))
    for i, r in enumerate(roles):
        if r == "1":
            steps.append((aten.unsqueeze.default, (i,)))
    return steps


def _apply_fake(value, steps, mode):
    for target, extra in steps:
        with mode:
            value = target(value, *extra)
    return value


def _insert_steps(graph: fx.Graph, node: fx.Node, steps, mode) -> fx.Node:
    """Insert the re-view ``steps`` after ``node`` (at the current insertion point)."""
    val = fake_value(node)
    for target, extra in steps:
        node = _call(graph, target, (node, *extra), (val, *extra), mode)
        val = node.meta["val"]
    return node


def _fused_op(precision: str = "bf16", score_dtype: torch.dtype = torch.float32):
    """The op that replaces the score and its extra arguments: exact scoring into fp32 (``indexer_logits``)
    or rounded once to a bf16/fp16 score (``indexer_logits_rounded``), or the fp8 scoring of
    ``kernels.indexer_fp8`` (fp32; a bf16/fp16 score gets a cast after it)."""
    from .kernels import indexer_fp8, lightning_indexer  # noqa: F401  (register the custom ops)

    if precision == "fp8":
        return torch.ops.fx_indexcache.indexer_logits_fp8.default, ()
    if score_dtype in _NARROW:
        return torch.ops.fx_indexcache.indexer_logits_rounded.default, (score_dtype,)
    return torch.ops.fx_indexcache.indexer_logits.default, ()


def kernel_refusal(q, k, w, scale: float) -> str | None:
    """Why the fused kernel cannot take these (fake) canonical leaves, or None (tests replace this off CUDA)."""
    from .kernels.lightning_indexer import unsupported_reason

    return unsupported_reason(q, k, w, scale=scale)


def fp8_refusal(q, k, w, scale: float) -> str | None:
    """Why the fp8 kernel cannot take these (fake) canonical leaves, or None (tests replace this off CUDA)."""
    from .kernels.indexer_fp8 import fp8_unsupported_reason

    return fp8_unsupported_reason(q, k, w, scale=scale)


def _describe(m: ScoreMatch) -> str:
    q, k = fake_value(m.q), fake_value(m.k)
    return (f"q {q.dtype} {tuple(q.shape)} [{''.join(m.q_roles)}], k {tuple(k.shape)} [{''.join(m.k_roles)}], "
            f"score {m.score_dtype} [{''.join(m.score_roles)}], scale {m.scale:g}")


def _leaf_steps(match: ScoreMatch) -> list[list[tuple]]:
    return [_canonical_steps(match.q_roles, "bshd"), _canonical_steps(match.k_roles, "btd"),
            _canonical_steps(match.w_roles, "bsh")]


def _check_leaves(match: ScoreMatch, check) -> str | None:
    """``check(q, k, w, scale=...)`` on the fake canonical leaves; a failing check is a refusal."""
    values = [fake_value(n) for n in (match.q, match.k, match.w)]
    mode = fake_mode_of(values)
    try:
        views = [_apply_fake(v, st, mode) for v, st in zip(values, _leaf_steps(match))]
        return check(*views, scale=match.scale)
    except Exception as e:  # never let the check break compilation
        return f"check failed: {type(e).__name__}: {e}"


def _emulates_eager_rounding() -> bool:
    """Whether Inductor is set to round every bf16/fp16 intermediate as eager does (then ``FP32_INSIDE`` is not
    the compiler's contract)."""
    from torch._inductor import config as inductor_config

    return bool(getattr(inductor_config, "emulate_precision_casts", False))


def _refusal(match: ScoreMatch) -> str | None:
    """Why this proven site still cannot be rewritten (stride readers, numerics contract, kernel support), or None."""
    if any(packet(u) is aten.as_strided for u in match.score.users):
        return "the score is read through as_strided (stride-dependent)"
    if match.numerics == FP32_INSIDE and _emulates_eager_rounding():
        return ("the graph rounds the score's intermediates to bf16/fp16 and torch._inductor.config."
                "emulate_precision_casts=True asks for those roundings; the fused kernel keeps them in fp32")
    why = _check_leaves(match, kernel_refusal)
    return None if why is None else f"fused kernel unsupported: {why}"


def _rewrite(graph: fx.Graph, match: ScoreMatch, precision: str = "bf16") -> int:
    """Replace ``match.score`` by the fused op of ``precision`` (re-viewed to the score's layout); returns
    nodes removed."""
    x = match.score
    mode = fake_mode_of([fake_value(n) for n in (match.q, match.k, match.w)])
    with insertions_undone_on_error(graph):
        with graph.inserting_before(x):
            q, k, w = (_insert_steps(graph, leaf, st, mode) for leaf, st in zip((match.q, match.k, match.w), _leaf_steps(match)))
            op, extra = _fused_op(precision, match.score_dtype)
            args = (q, k, w, False, float(match.scale), None, *extra)
            fake_args = (q.meta["val"], k.meta["val"], w.meta["val"], False, float(match.scale), None, *extra)
            fused = _call(graph, op, args, fake_args, mode)
            result = fused
            if result.meta["val"].dtype != match.score_dtype:  # fp8 scores in fp32: round as the graph stores it
                result = _call(graph, prims.convert_element_type.default, (result, match.score_dtype),
                               (result.meta["val"], match.score_dtype), mode)
            result = _insert_steps(graph, result, _restore_steps("bst", match.score_roles), mode)
        if tuple(result.meta["val"].shape) != tuple(fake_value(x).shape) or result.meta["val"].dtype != _dtype(x):
            raise RuntimeError(f"re-viewed result {tuple(result.meta['val'].shape)} {result.meta['val'].dtype} is not "
                               f"the score's shape and dtype")
    take_provenance(fused, x)
    x.replace_all_uses_with(result)
    dead = dead_if_removed([x])
    erase_dead(graph, dead)
    return len(dead)


def _topk_indices(graph: fx.Graph, x: fx.Node, xv: torch.Tensor, k: int, sorted_: bool, mode) -> fx.Node:
    """Nodes (at the graph's insertion point) computing int64 indices of ``x``'s k largest over its last dim with
    ``fx_indexcache::topk_indices``; a bf16/fp16 ``x`` is widened to fp32 first (exact: the same values, so the
    same k largest but for the choice among ties) because our kernels take fp32 rows."""
    from .kernels import lightning_indexer  # noqa: F401  (registers the custom ops)

    rows, rows_v = x, xv
    if xv.dtype in _NARROW:
        rows = _call(graph, prims.convert_element_type.default, (x, torch.float32), (xv, torch.float32), mode)
        rows_v = rows.meta["val"]
    idx32 = _call(graph, torch.ops.fx_indexcache.topk_indices.default, (rows, k, sorted_), (rows_v, k, sorted_), mode)
    return _call(graph, prims.convert_element_type.default, (idx32, torch.int64), (idx32.meta["val"], torch.int64),
                 mode)


def _swap_topk(graph: fx.Graph, topk: fx.Node) -> str | None:
    """Replace ``aten.topk`` over the last dim by ``fx_indexcache::topk_indices`` (the Triton top-k where it
    applies at run time, torch.topk elsewhere) keeping the graph's ``sorted``; values, if read, are gathered.
    A bf16/fp16 top-k input is widened to fp32 first (exact: the same values, so the same k largest but for
    the choice among ties) because our kernels take fp32 rows. Returns None when swapped, else why not."""
    x, k, dim, largest, keep_sorted = topk_arguments(topk)
    xv = fake_value(x)
    if not isinstance(k, int) or not largest or _norm_dim(dim, xv.dim()) != xv.dim() - 1:
        return "top-k kept as aten.topk: not the largest-k over the last dim with a static k"
    users = list(topk.users)
    if any(u.target is not operator.getitem for u in users):
        return "top-k kept as aten.topk: its pair is read whole"
    mode = fake_mode_of([xv])
    with graph.inserting_before(topk):
        idx = _topk_indices(graph, x, xv, k, bool(keep_sorted), mode)
        vals = None
        if any(u.args[1] == 0 and u.users for u in users):
            vals = _call(graph, aten.gather.default, (x, xv.dim() - 1, idx), (xv, xv.dim() - 1, idx.meta["val"]), mode)
    for u in users:
        u.replace_all_uses_with(idx if u.args[1] == 1 else vals)
        graph.erase_node(u)
    graph.erase_node(topk)
    return None


def _swap_sort_cut(graph: fx.Graph, sort: fx.Node) -> str | None:
    """Replace a descending sort over the last dim cut to its first k keys by ``fx_indexcache::topk_indices`` with
    sorted output: the same k keys in the same order (equal scores by ascending index, which a stable sort also
    gives), without sorting the whole row. Returns None when swapped, else why not."""
    cut = leading_cut(sort)
    if isinstance(cut, str):
        return f"selection kept as aten.sort: {cut}"
    x, dim, descending, _ = sort_arguments(sort)
    xv = fake_value(x)
    k = fake_value(cut).shape[-1]  # the keys the cut keeps (its end clamped to the row, as slicing does)
    if not descending or not isinstance(k, int) or _norm_dim(dim, xv.dim()) != xv.dim() - 1:
        return "selection kept as aten.sort: not a descending sort over the last dim cut to a static k"
    mode = fake_mode_of([xv])
    with graph.inserting_before(sort):
        idx = _topk_indices(graph, x, xv, k, True, mode)
    cut.replace_all_uses_with(idx)
    graph.erase_node(cut)
    for user in list(sort.users):
        graph.erase_node(user)
    graph.erase_node(sort)
    return None


def _fuse_score_and_topk(graph: fx.Graph, match: ScoreMatch, topk: fx.Node, precision: str) -> tuple[str | None, int]:
    """Where only the top-k's indices are read, the site's scoring, masks and top-k become one
    ``indexer_topk_fused`` (``fused_topk_site``). Returns ``(None, nodes removed)`` when rewritten, else
    ``(why not, 0)`` with the graph untouched (the site then gets the two-kernel path)."""
    from . import fused_topk_site as fts

    plan = fts.plan_site(match, topk, precision)
    if isinstance(plan, str):
        return plan, 0
    why = _check_leaves(match, lambda q, k, w, scale: fts.fused_topk_refusal(q, k, w, scale, plan.k))
    if why is not None:
        return f"fused kernel unsupported: {why}", 0
    try:
        return None, fts.rewrite_site(graph, match, plan)
    except Exception as e:
        return f"inserting it failed: {type(e).__name__}: {e}", 0


def site_name(site) -> tuple[str, int | None]:
    """How records name a site: ("layer 3", 3), or the top-k node's name where the layer is unknown."""
    layer = getattr(site, "layer", None)
    anchor = getattr(site, "anchor", site)
    return (f"layer {layer}" if layer is not None else anchor.name), layer


def substitute_fused_indexer(graph: fx.Graph, sites, precision: str = "bf16", *,
                             score_and_topk: bool = False) -> list[FusionRecord]:
    """Replace each live site's unmasked indexer score by one ``fx_indexcache::indexer_logits`` call
    (``precision="fp8"``: ``indexer_logits_fp8`` where ``fp8_refusal`` finds nothing, else the bf16 op).

    ``sites``: ``TopkIndexerSite`` objects (e.g. ``detect(graph).sites``; sites whose top-k the
    IndexCache rewrite already deleted are skipped) or ``aten.topk`` nodes. A site is rewritten only
    when its score is proven to be the indexer score (see the module doc) and ``kernel_refusal`` finds
    nothing against the leaves (CUDA, bf16/fp16 q and k, static H and D with D a power of two in
    [16, 256]). With ``score_and_topk`` (the config's ``fuse_score_and_topk``, off by default: slower than
    the two kernels where measured), where the score feeds nothing but the top-k's indices (through at most an
    additive mask and a -inf fill), the score, masks and top-k become one ``fx_indexcache::indexer_topk_fused``
    instead, which writes no logits (``fused_topk_site``; ``fused_topk_refusal`` checks its support); a record
    of a two-kernel site says why that was not done. Returns one record per live site. Refused sites on CUDA are logged as
    warnings.
    """
    records: list[FusionRecord] = []
    for site in sites:
        anchor = getattr(site, "anchor", site)
        if getattr(anchor, "_erased", False) or anchor.graph is not graph:
            continue
        name, layer = site_name(site)
        match = match_indexer_score(site)
        why = match if isinstance(match, str) else _refusal(match)
        applied, no_fp8 = "bf16", None
        if why is None and precision == "fp8":
            no_fp8 = _check_leaves(match, fp8_refusal)
            applied = "fp8" if no_fp8 is None else "bf16"
        sort_cut = is_sort(anchor)
        not_one_op = None
        if not score_and_topk:
            not_one_op = "fuse_score_and_topk is off"
        elif sort_cut:
            not_one_op = "the selection is a sort cut to k, which the one op does not take"
        if why is None and not_one_op is None:
            not_one_op, removed = _fuse_score_and_topk(graph, match, anchor, applied)
            if not_one_op is None:
                records.append(FusionRecord(
                    name, layer, True, f"{_describe(match)}; {removed} nodes replaced; score + top-k in one op, "
                    "no logits written (only the indices are read)", applied, no_fp8, match.numerics,
                    str(match.score_dtype).removeprefix("torch."), topk_fused=True))
                continue
        if why is None:
            try:
                removed = _rewrite(graph, match, applied)
            except Exception as e:
                why = f"inserting the fused op failed: {type(e).__name__}: {e}"
        if why is not None:
            records.append(FusionRecord(name, layer, False, why))
            if getattr(fake_value(anchor.args[0]), "is_cuda", False):
                logger.warning("fx_indexcache: %s keeps its unfused indexer scoring: %s", name, why)
            continue
        kept = _swap_sort_cut(graph, anchor) if sort_cut else _swap_topk(graph, anchor)
        topk_note = "top-k fx_indexcache::topk_indices" if kept is None else kept
        topk_note += f" (score + top-k not in one op: {not_one_op})"
        records.append(FusionRecord(name, layer, True, f"{_describe(match)}; {removed} nodes replaced; {topk_note}",
                                    applied, no_fp8, match.numerics, str(match.score_dtype).removeprefix("torch.")))
    if any(r.fused for r in records):
        graph.lint()
    return records
