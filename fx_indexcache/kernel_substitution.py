"""Swap an F layer's indexer scoring for the fused Triton kernel (``fx_indexcache::indexer_logits``).

After the IndexCache rewrite, each remaining indexer site is an ``aten.topk`` whose input is

    X[b, s, t] = sum_h  w[b, s, h] * relu(c * sum_d q[b, s, h, d] * k[b, t, d])

(reached through views, permutes, dtype casts and the batched products that einsum/matmul lower
to), optionally followed by a mask (``where`` / ``masked_fill`` / an additive mask). This module
finds ``X`` (the unmasked score), recovers the leaves ``q``, ``k`` and ``w`` and replaces ``X`` by one
``indexer_logits(q', k', w', causal=False, scale=c)`` call, where ``q'``, ``k'``, ``w'`` are the leaves
re-viewed as ``[B, S, H, D]``, ``[B, T, D]`` and ``[B, S, H]``. The graph keeps its own mask and top-k,
so any mask (causal, padding, additive) stays exactly as the model wrote it.

Matching is proof-carrying, not by shape guess: each leaf dimension gets an index label, every
view / permute / expand / reshape between the leaves and ``X`` is replayed on those labels (a
reshape may only merge or split groups of whole labels), each product unifies the labels it pairs
(batch and contracted axes) and records what it sums over. The rewrite is made only when the
labels prove that ``X``'s three axes are (b, s, t), the inner product sums exactly over one axis
``d`` shared by q and k, the outer sum exactly over one axis ``h`` shared by w and the ReLU'd
product, and that every non-unit leaf axis plays exactly one of those roles. Anything else (an op
the replay does not know, a narrowing cast, a slice inside a chain, a negative scale, a diagonal,
a broadcast that is summed over) leaves the site untouched with a note.

Rounding: the models cast bf16 q and k to fp32 before the product; the kernel reads the bf16
tensors before those casts (``q'``/``k'`` are the tensors ahead of the casts), multiplies them on the
tensor cores and accumulates in fp32. bf16 x bf16 products are exact in fp32, so against the model's
own (eager) semantics only the accumulation order of the d- and h-sums changes: measured relative
norm error 7e-6 (T=8K) to 1.7e-5 (T=32K) on an H100 at V3.2 indexer dims. Against Inductor's default
code the difference is ~1.2e-3, because Inductor (``emulate_precision_casts=False``) fuses RoPE, the
cast to bf16 and the cast back and skips that rounding; with ``emulate_precision_casts=True`` it
agrees with the fused path to 7e-6 as well. Top-k sets then agree except at near-ties (keys within
~1e-3 x max|score| of the K-th score). See docs/notes/kernel_substitution.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Sequence

import sympy
import torch
from torch import fx

from .graph_utils import dead_if_removed, erase_dead, fake_value, is_call, packet

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = [
    "FUSED_NOTE",
    "ScoreMatch",
    "match_indexer_score",
    "substitute_fused_indexer",
]

#: Ops that re-view one tensor without changing values (replayed on labels).
_RESHAPES = {aten.view, aten.reshape, aten._unsafe_view, aten.squeeze, aten.unsqueeze, aten.flatten}
_PERMUTES = {aten.permute, aten.transpose, aten.t}
_IDENTITIES = {aten.clone, aten.contiguous, aten.alias, aten.lift_fresh_copy}
_CASTS = {prims.convert_element_type, aten._to_copy}
_EXPANDS = {aten.expand}
_CHAIN = _RESHAPES | _PERMUTES | _IDENTITIES | _CASTS | _EXPANDS
_WIDE = (torch.float32, torch.float64)
_MASKS = {aten.where, aten.masked_fill, aten.add, aten.sub, aten.mul}
_MAX_CHAIN = 48
#: Text in a returned note when the site was rewritten (``"layer 3: fused indexer_logits (...)"``).
FUSED_NOTE = "fused indexer_logits"


class _NoMatch(Exception):
    """The scoring subgraph is not (provably) the indexer score; the message says why."""


# ----------------------------------------------------------------------------------------------
# Label algebra
# ----------------------------------------------------------------------------------------------


def _sym(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _eq(a: sympy.Expr, b: sympy.Expr) -> bool:
    try:
        return bool(sympy.expand(a - b) == 0)
    except TypeError:
        return False


def _is_one(size) -> bool:
    expr = size if isinstance(size, sympy.Basic) else _sym(size)
    return _eq(expr, sympy.Integer(1))


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
        if not _eq(self.size[a], self.size[b]):
            raise _NoMatch("paired axes differ in size")
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def classes(self, dim: Sequence[int]) -> list[int]:
        return [self.find(a) for a in dim]


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
    dims = [[] if _eq(s, sympy.Integer(1)) else [labels.new(s, "leaf")] for s in shape]
    return _Tracked(dims, shape)


def _regroup(labels: _Labels, tracked: _Tracked, out_shape: tuple) -> _Tracked:
    """Row-major reshape on labels: each output dim takes whole atoms, in order."""
    atoms = [a for dim in tracked.dims for a in dim]
    dims, i = [], 0
    for size in out_shape:
        if _eq(size, sympy.Integer(1)):
            dims.append([])
            continue
        group, prod = [], sympy.Integer(1)
        while i < len(atoms) and not _eq(prod, size):
            group.append(atoms[i])
            prod = prod * labels.size[atoms[i]]
            i += 1
        if not _eq(prod, size):
            raise _NoMatch("a reshape splits an axis of q, k or w")
        dims.append(group)
    if i != len(atoms):
        raise _NoMatch("a reshape splits an axis of q, k or w")
    return _Tracked(dims, tuple(out_shape))


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _replay(labels: _Labels, node: fx.Node, tracked: _Tracked) -> _Tracked:
    """Apply one chain op to the labels of its (only) tensor input."""
    op = packet(node)
    out_shape = _shape(node)
    if op in _RESHAPES:
        return _regroup(labels, tracked, out_shape)
    if op in _IDENTITIES:
        return _Tracked(list(tracked.dims), out_shape)
    if op in _CASTS:
        src, dst = fake_value(node.args[0]), fake_value(node)
        if dst.dtype not in _WIDE or not src.dtype.is_floating_point or src.dtype.itemsize > dst.dtype.itemsize:
            raise _NoMatch(f"{node.name} casts {src.dtype} to {dst.dtype} (only widening casts keep values)")
        if op is aten._to_copy and set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}:
            raise _NoMatch(f"{node.name}: _to_copy with unexpected arguments")
        if op is aten._to_copy and dst.device != src.device:
            raise _NoMatch(f"{node.name} moves the tensor to another device")
        return _Tracked(list(tracked.dims), out_shape)
    if op in _PERMUTES:
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
    if op in _EXPANDS:
        n_new = len(out_shape) - len(tracked.dims)
        if n_new < 0:
            raise _NoMatch("expand drops dims")
        dims = []
        for j, size in enumerate(out_shape):
            i = j - n_new
            if i < 0 or (_eq(tracked.shape[i], sympy.Integer(1)) and not _eq(size, sympy.Integer(1))):
                dims.append([] if _eq(size, sympy.Integer(1)) else [labels.new(size, "broadcast")])
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


def _chain_back(node: fx.Node, extra: Iterable = ()) -> tuple[fx.Node, list[fx.Node]]:
    """Walk up through chain ops (and ``extra`` scalar ops); return the first other node and the chain."""
    chain = []
    extra = set(extra)
    while isinstance(node, fx.Node) and node.op == "call_function" and len(chain) < _MAX_CHAIN:
        op = packet(node)
        if op in _CHAIN or (op in extra and _scalar_factor(node) is not None):
            chain.append(node)
            node = node.args[0]
            continue
        break
    return node, chain[::-1]  # forward order


def _scalar_factor(node: fx.Node) -> float | None:
    """For ``mul(x, c)`` / ``div(x, c)`` with a Python number ``c``: the factor on x; else None."""
    op = packet(node)
    if op not in (aten.mul, aten.div) or len(node.args) != 2 or node.kwargs:
        return None
    c = node.args[1]
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        return None
    if op is aten.div:
        return None if c == 0 else 1.0 / float(c)
    return float(c)


def _is_relu(node: fx.Node) -> bool:
    if is_call(node, {aten.relu, aten.relu_}):
        return True
    if is_call(node, {aten.clamp_min}) and len(node.args) == 2 and node.args[1] == 0:
        return True
    return False


def _product_parts(node: fx.Node):
    """``(kind, a, b, reduced_dims, keepdim, mul)`` for bmm/mm or sum(mul(a, b)); None otherwise."""
    if is_call(node, {aten.bmm, aten.mm}):
        return ("bmm" if packet(node) is aten.bmm else "mm", node.args[0], node.args[1], None, False, None)
    if is_call(node, {aten.sum}) and node.target is not aten.sum.default:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if node.kwargs.get("dtype") is not None or not dims:
            return None
        mul = node.args[0]
        if is_call(mul, {aten.mul}) and len(mul.args) == 2 and all(isinstance(a, fx.Node) for a in mul.args):
            return ("sum", mul.args[0], mul.args[1], list(dims), bool(keepdim), mul)
    return None


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
        if _eq(xa, sympy.Integer(1)):
            prod_dims.append(list(db))
        elif _eq(xb, sympy.Integer(1)):
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
    ``b s h`` for w) or ``"1"`` for a unit dimension that plays none.
    """

    score: fx.Node
    q: fx.Node
    k: fx.Node
    w: fx.Node
    q_roles: tuple[str, ...]
    k_roles: tuple[str, ...]
    w_roles: tuple[str, ...]
    scale: float
    inner: fx.Node
    outer: fx.Node
    relu: fx.Node


def _match_at(x: fx.Node) -> ScoreMatch:
    value = fake_value(x)
    if not isinstance(value, torch.Tensor) or value.dim() != 3:
        raise _NoMatch("the score is not a 3-D tensor")
    if value.dtype != torch.float32:
        raise _NoMatch(f"the score is {value.dtype}, the kernel writes float32")
    outer, x_chain = _chain_back(x)
    outer_parts = _product_parts(outer)
    if outer_parts is None:
        raise _NoMatch(f"the score comes from {outer.name} ({outer.target}), not a head-weighted sum")
    sides = []
    for operand in outer_parts[1:3]:
        root, chain = _chain_back(operand)
        sides.append((root, chain))
    relu_sides = [i for i, (root, _) in enumerate(sides) if _is_relu(root)]
    if len(relu_sides) != 1:
        raise _NoMatch("the head-weighted sum does not weight exactly one ReLU")
    ri = relu_sides[0]
    relu, relu_chain = sides[ri]
    w_leaf, w_chain = sides[1 - ri]
    inner, scaled_chain = _chain_back(relu.args[0], extra=(aten.mul, aten.div))
    inner_parts = _product_parts(inner)
    if inner_parts is None:
        raise _NoMatch(f"the ReLU's input comes from {inner.name} ({inner.target}), not a q.k product")
    (qa, qa_chain), (kb, kb_chain) = (_chain_back(o) for o in inner_parts[1:3])
    leaves = [qa, kb, w_leaf]
    if len({id(n) for n in leaves}) != 3:
        raise _NoMatch("q, k and w are not three distinct tensors")
    for leaf in leaves:
        if _is_relu(leaf) or _product_parts(leaf) is not None:
            raise _NoMatch(f"{leaf.name} is itself a ReLU or product")

    labels = _Labels()
    t_a, t_b, t_w = _leaf(labels, qa), _leaf(labels, kb), _leaf(labels, w_leaf)
    leaf_dims = [list(t.dims) for t in (t_a, t_b, t_w)]
    for node in qa_chain:
        t_a = _replay(labels, node, t_a)
    for node in kb_chain:
        t_b = _replay(labels, node, t_b)
    prod, inner_sum = _combine(labels, inner_parts, t_a, t_b, inner)
    scale = 1.0
    for node in scaled_chain:
        factor = _scalar_factor(node)
        if factor is not None and packet(node) in (aten.mul, aten.div):
            scale *= factor
            prod = _Tracked(prod.dims, _shape(node))
        else:
            prod = _replay(labels, node, prod)
    if not (math.isfinite(scale) and scale >= 0.0):
        raise _NoMatch(f"scale {scale} before the ReLU is not a finite non-negative number")
    r = _Tracked(prod.dims, _shape(relu))
    for node in relu_chain:
        r = _replay(labels, node, r)
    for node in w_chain:
        t_w = _replay(labels, node, t_w)
    ops = (r, t_w) if ri == 0 else (t_w, r)
    score, outer_sum = _combine(labels, outer_parts, *ops, outer)
    for node in x_chain:
        score = _replay(labels, node, score)

    # --- what the labels prove ---
    cls = labels.find
    d_set = {cls(a) for a in inner_sum}
    h_set = {cls(a) for a in outer_sum}
    if len(d_set) != 1 or len(inner_sum) != 1:
        raise _NoMatch("the q.k product does not sum over exactly one axis")
    if len(h_set) != 1 or len(outer_sum) != 1:
        raise _NoMatch("the weighted sum does not sum over exactly one (head) axis")
    (d,), (h,) = d_set, h_set
    out = []
    for dim in score.dims:
        if len(dim) > 1:
            raise _NoMatch("a score axis merges several axes")
        out.append(cls(dim[0]) if dim else None)
    b, s, t = out
    roles = {c: name for c, name in ((b, "b"), (s, "s"), (t, "t"), (h, "h"), (d, "d")) if c is not None}
    if len(roles) != sum(c is not None for c in (b, s, t, h, d)):
        raise _NoMatch("two roles share one axis (a diagonal)")

    def role_tuple(dims, needed: str, what: str) -> tuple[str, ...]:
        got = []
        for dim in dims:
            if not dim:
                got.append("1")
                continue
            role = roles.get(cls(dim[0]))
            if role is None or role not in needed:
                raise _NoMatch(f"an axis of {what} plays no role of {needed!r}")
            got.append(role)
        real = [g for g in got if g != "1"]
        if len(set(real)) != len(real):
            raise _NoMatch(f"{what} uses one role on two axes")
        return tuple(got)

    ra = role_tuple(leaf_dims[0], "bshdt", "the first product operand")
    rb = role_tuple(leaf_dims[1], "bshdt", "the second product operand")
    # q is the operand with the query (s) or head (h) axis, k the one with the key (t) axis
    qa_like = ("t" not in ra, bool(set(ra) & {"s", "h"}))
    kb_like = ("t" not in rb, bool(set(rb) & {"s", "h"}))
    if "t" in rb and "t" not in ra or ("t" not in ra and "t" not in rb and qa_like[1] and not kb_like[1]):
        q_node, k_node, q_dims, k_dims = qa, kb, leaf_dims[0], leaf_dims[1]
    elif "t" in ra and "t" not in rb or ("t" not in ra and "t" not in rb and kb_like[1] and not qa_like[1]):
        q_node, k_node, q_dims, k_dims = kb, qa, leaf_dims[1], leaf_dims[0]
    else:
        raise _NoMatch("cannot tell q from k")
    q_roles = role_tuple(q_dims, "bshd", "q")
    k_roles = role_tuple(k_dims, "btd", "k")
    w_roles = role_tuple(leaf_dims[2], "bsh", "w")
    sizes = {"b": value.shape[0], "s": value.shape[1], "t": value.shape[2], "h": labels.size[h], "d": labels.size[d]}
    for leaf_roles, needed, what in ((q_roles, "bshd", "q"), (k_roles, "btd", "k"), (w_roles, "bsh", "w")):
        for role in needed:
            if role not in leaf_roles and not _is_one(sizes[role]):
                raise _NoMatch(f"{what} is broadcast along its {role} axis")
    # broadcast atoms may pair with real ones, but a summed axis must be real on both sides
    for c in (h, d):
        if not any(labels.origin[a] == "leaf" and cls(a) == c for a in range(len(labels.parent))):
            raise _NoMatch("a summed axis is a broadcast")
    return ScoreMatch(x, q_node, k_node, w_leaf, q_roles, k_roles, w_roles, scale, inner, outer, relu)


def _score_candidates(topk_input: fx.Node) -> list[fx.Node]:
    """The top-k input and, through at most two mask ops, the [B, S, T] tensors they mask."""
    found, frontier = [topk_input], [topk_input]
    for _ in range(2):
        nxt = []
        for node in frontier:
            if not is_call(node, _MASKS):
                continue
            for arg in node.all_input_nodes:
                value = fake_value(arg)
                if isinstance(value, torch.Tensor) and value.dim() == 3 and arg not in found:
                    found.append(arg)
                    nxt.append(arg)
        frontier = nxt
    return found


def match_indexer_score(site) -> ScoreMatch | str:
    """The proven score under ``site``'s top-k (a ``TopkIndexerSite`` or an ``aten.topk`` node), or why not."""
    anchor = getattr(site, "anchor", site)
    if not is_call(anchor, {aten.topk}):
        return f"{anchor.name} is not an aten.topk"
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


def _fake_mode(values):
    """The fake mode the leaves' values live in (a no-op context where there is none)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode(values) or contextlib.nullcontext()


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


def _apply_fake(value, steps, mode):
    for target, extra in steps:
        with mode:
            value = target(value, *extra)
    return value


def _canonical(graph: fx.Graph, leaf: fx.Node, steps, mode) -> fx.Node:
    """Insert the re-view ``steps`` after ``leaf`` (at the current insertion point)."""
    node, val = leaf, fake_value(leaf)
    for target, extra in steps:
        node = _call(graph, target, (node, *extra), (val, *extra), mode)
        val = node.meta["val"]
    return node


def _fused_op():
    from .kernels import lightning_indexer  # noqa: F401  (registers the custom ops)

    return torch.ops.fx_indexcache.indexer_logits.default


def _describe(m: ScoreMatch) -> str:
    q, k = fake_value(m.q), fake_value(m.k)
    return f"q {q.dtype} {tuple(q.shape)} [{''.join(m.q_roles)}], k {tuple(k.shape)} [{''.join(m.k_roles)}], scale {m.scale:g}"


def substitute_fused_indexer(graph: fx.Graph, sites, *, force: bool = False) -> list[str]:
    """Replace each live site's unmasked indexer score by one ``fx_indexcache::indexer_logits`` call.

    ``sites``: ``TopkIndexerSite`` objects (e.g. ``detect(graph).sites``; sites whose top-k the
    IndexCache rewrite already deleted are skipped) or ``aten.topk`` nodes. A site is rewritten only
    when its score is proven to be the indexer score (see the module doc) and the kernel supports the
    leaves (``is_supported`` on their fake values: CUDA, bf16/fp16 q and k, static H and D with D a
    power of two in [16, 256]). ``force=True`` skips the support check (tests only: off CUDA the op
    runs its reference). Returns one note per site saying what was done or why not.
    """
    notes: list[str] = []
    changed = False
    for site in sites:
        anchor = getattr(site, "anchor", site)
        name = f"layer {site.layer}" if getattr(site, "layer", None) is not None else anchor.name
        if getattr(anchor, "_erased", False) or anchor.graph is not graph:
            continue
        match = match_indexer_score(site)
        if isinstance(match, str):
            notes.append(f"{name}: left as is: {match}")
            continue
        if any(packet(u) is aten.as_strided for u in match.score.users):
            notes.append(f"{name}: left as is: the score is read through as_strided (stride-dependent)")
            continue
        from .kernels.lightning_indexer import unsupported_reason

        qv, kv, wv = fake_value(match.q), fake_value(match.k), fake_value(match.w)
        mode = _fake_mode([qv, kv, wv])
        steps = [
            _canonical_steps(match.q_roles, "bshd"),
            _canonical_steps(match.k_roles, "btd"),
            _canonical_steps(match.w_roles, "bsh"),
        ]
        if not force:
            try:
                views = [_apply_fake(v, st, mode) for v, st in zip((qv, kv, wv), steps)]
                why = unsupported_reason(*views, scale=match.scale)
            except Exception as e:  # never let the check break compilation
                why = f"check failed: {type(e).__name__}: {e}"
            if why is not None:
                notes.append(f"{name}: left as is: fused kernel unsupported: {why}")
                continue
        x = match.score
        before = set(graph.nodes)
        try:
            op = _fused_op()
            with graph.inserting_before(x):
                q, k, w = (_canonical(graph, leaf, st, mode) for leaf, st in zip((match.q, match.k, match.w), steps))
                args = (q, k, w, False, float(match.scale), None)
                fake_args = (q.meta["val"], k.meta["val"], w.meta["val"], False, float(match.scale), None)
                fused = _call(graph, op, args, fake_args, mode)
        except Exception as e:  # undo the inserted nodes; the site keeps its own scoring
            for node in reversed([n for n in graph.nodes if n not in before]):
                graph.erase_node(node)
            notes.append(f"{name}: left as is: inserting the fused op failed: {type(e).__name__}: {e}")
            continue
        fused.meta["stack_trace"] = x.meta.get("stack_trace")
        if "nn_module_stack" in x.meta:
            fused.meta["nn_module_stack"] = x.meta["nn_module_stack"]
        x.replace_all_uses_with(fused)
        dead = dead_if_removed([x])
        erase_dead(graph, dead)
        changed = True
        notes.append(f"{name}: {FUSED_NOTE} ({_describe(match)}; {len(dead)} nodes replaced)")
    if changed:
        graph.lint()
    return notes
