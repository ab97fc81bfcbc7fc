"""Score + top-k in one op at an F layer whose score feeds only its top-k's indices (``indexer_topk_fused``).

``substitute.substitute_fused_indexer`` proves a site's score first (``match_indexer_score``); this module then
decides whether the whole ``score -> mask -> topk -> indices`` tail can become one
``fx_indexcache::indexer_topk_fused`` call, which scores and selects without writing the ``[S, T]`` logits, and
makes that rewrite. Where it cannot (``plan_site`` returns the reason), the site keeps the two-kernel path
(``indexer_logits`` + ``topk_indices``) and its record says why.

Admitted, and only this (anything else is a reason, never a guess):

* the score is fp32 (a bf16/fp16 score's top-k reads the rounded score: the fused op would select from fp32),
  its key axis is its last and the top-k's dim, the top-k is the largest-k with a static k;
* between the score and the top-k, in this order, at most an additive mask ``add(score, M)`` (M floating,
  the sum fp32) and at most one fill with -inf (``masked_fill(., C, -inf)``, ``where(C, ., -inf)``,
  ``where(C, -inf, .)``), neither growing the score's shape; every node of that tail, the score included, read
  by the next one only -- a score or masked score read anywhere else is materialised, so the site keeps the
  two kernels;
* the top-k's values are not read (only its indices);
* bf16 scoring (``indexer_precision="fp8"`` keeps the fp8 logits kernel and the separate top-k) and
  ``fused_topk_refusal`` finding nothing against the leaves (CUDA, the kernel's dtypes and sizes, k).

The masks go to the op as they are (re-viewed to ``[B, S, T]`` with unit axes where they broadcast): ``bias``
is the additive mask, ``drop`` the fill's condition (negated for ``where(C, ., -inf)``). The op's additive mask is
added to the score, then the fill applied: the graph's own order. With ``causal=False`` and no ``kv_lens`` the op
adds no mask of its own, so the masked score it selects from is the graph's.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch import fx

from ..detection.topk import topk_arguments
from ..graph_utils import (
    dead_if_removed,
    erase_dead,
    fake_mode_of,
    fake_value,
    insertions_undone_on_error,
    is_call,
    packet,
    take_provenance,
)

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["FusedTopkPlan", "fused_topk_refusal", "plan_site", "rewrite_site"]

#: The op's name in reports.
OP_NAME = "indexer_topk_fused"


@dataclasses.dataclass(frozen=True)
class FusedTopkPlan:
    """What ``rewrite_site`` replaces: the top-k node, its masks and the tail of nodes that die with it."""

    topk: fx.Node
    k: int
    sorted: bool
    bias: fx.Node | None  # the additive mask, in the score's layout
    drop: fx.Node | None  # the fill's condition, True = -inf, in the score's layout
    negate_drop: bool  # the graph's condition keeps where True (``where(C, x, -inf)``)
    tail: tuple[fx.Node, ...]  # score -> ... -> top-k input, in order


def fused_topk_refusal(q, k, w, scale: float, topk: int) -> str | None:
    """Why the fused score + top-k cannot take these (fake) canonical leaves, or None (tests replace this off
    CUDA, as ``substitute.kernel_refusal``)."""
    from .kernels.fused_score_topk import fused_unsupported_reason

    return fused_unsupported_reason(q, k, w, topk, scale=scale)


def _is_neg_inf(arg) -> bool:
    """A -inf fill value: the Python float, or a one-element constant (``full`` / ``scalar_tensor``) of it."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return math.isinf(arg) and arg < 0
    if is_call(arg, {aten.full, aten.scalar_tensor}) and arg.args:
        value = arg.args[1] if packet(arg) is aten.full else arg.args[0]
        shape = arg.args[0] if packet(arg) is aten.full else ()
        return (isinstance(value, (int, float)) and math.isinf(value) and value < 0
                and all(s == 1 for s in shape))
    return False


def _fill_parts(node: fx.Node):
    """``(input, condition, negate)`` of a -inf fill (``negate``: the condition keeps where True), or None."""
    args = node.args
    if is_call(node, {aten.masked_fill}) and len(args) == 3 and _is_neg_inf(args[2]):
        return args[0], args[1], False
    if is_call(node, {aten.where}) and len(args) == 3:
        if _is_neg_inf(args[2]) and isinstance(args[1], fx.Node):
            return args[1], args[0], True
        if _is_neg_inf(args[1]) and isinstance(args[2], fx.Node):
            return args[2], args[0], False
    return None


def _add_parts(node: fx.Node, score_side: fx.Node):
    """The other operand of ``add(score_side, M)`` (either order, alpha 1), or None."""
    if not is_call(node, {aten.add}) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    other = b if a is score_side else a if b is score_side else None
    return other if isinstance(other, fx.Node) else None


def _only_user(node: fx.Node, expected: fx.Node) -> str | None:
    others = [u.name for u in node.users if u is not expected]
    return None if not others else f"{node.name} is also read by {', '.join(others[:3])} (it would be materialised)"


def plan_site(match, topk: fx.Node, precision: str) -> FusedTopkPlan | str:
    """The fused score + top-k rewrite of a proven site (``match``: ``substitute.ScoreMatch``), or why not."""
    if precision != "bf16":
        return f"{precision} scoring keeps its logits kernel and the separate top-k"
    x, k, dim, largest, keep_sorted = topk_arguments(topk)
    score = match.score
    sv = fake_value(score)
    if sv.dtype != torch.float32:
        return f"the score is {str(sv.dtype).removeprefix('torch.')}: its top-k reads the rounded score"
    if not isinstance(k, int) or not largest or (dim % sv.dim()) != sv.dim() - 1:
        return "the top-k is not the largest-k over the last dim with a static k"
    if match.score_roles[-1] != "t":
        return "the score's key axis is not its last"
    if any(u.target is not operator.getitem for u in topk.users):
        return "the top-k's pair is read whole"
    if any(u.args[1] == 0 and u.users for u in topk.users):
        return "the top-k's values are read"
    # walk from the top-k's input back to the score: [fill] <- [add] <- score
    tail, node, bias, drop, negate = [], x, None, None, False
    parts = _fill_parts(node) if isinstance(node, fx.Node) else None
    if parts is not None:
        inner, drop, negate = parts
        if not isinstance(drop, fx.Node) or fake_value(drop).dtype != torch.bool:
            return f"{node.name} fills where a non-bool condition holds"
        tail.append(node)
        node = inner
    if node is not score:
        bias = _add_parts(node, score)
        if bias is None:
            what = f"{node.name} ({node.target})" if isinstance(node, fx.Node) else repr(node)
            return f"{what} stands between the score and the top-k (only an additive mask and a -inf fill are fused)"
        bv = fake_value(bias)
        if not bv.dtype.is_floating_point or fake_value(node).dtype != torch.float32:
            return f"{node.name} adds a {bv.dtype} mask or is not fp32"
        tail.append(node)
        node = score
    tail.append(score)
    tail.reverse()  # score first
    for a, b in zip(tail, tail[1:] + [topk]):
        why = _only_user(a, b)
        if why is not None:
            return why
    for t in tail[1:]:
        if tuple(fake_value(t).shape) != tuple(sv.shape):
            return f"{t.name} broadcasts the score to another shape"
    return FusedTopkPlan(topk, int(k), bool(keep_sorted), bias, drop, negate, tuple(tail))


def rewrite_site(graph: fx.Graph, match, plan: FusedTopkPlan) -> int:
    """Replace the site's scoring, masks and top-k by one ``indexer_topk_fused`` call; returns nodes removed.

    On any failure the inserted nodes are erased and the graph is as it was (the caller keeps two kernels)."""
    from . import substitute as sub
    from .kernels import fused_score_topk  # noqa: F401  (registers the op)

    x = match.score
    mode = fake_mode_of([fake_value(n) for n in (match.q, match.k, match.w)])
    with insertions_undone_on_error(graph):
        with graph.inserting_before(plan.topk):
            q, k, w = (sub._insert_steps(graph, leaf, st, mode)
                       for leaf, st in zip((match.q, match.k, match.w), sub._leaf_steps(match)))
            masks = []
            for m, negate in ((plan.bias, False), (plan.drop, plan.negate_drop)):
                if m is None:
                    masks.append(None)
                    continue
                if negate:
                    m = sub._call(graph, aten.logical_not.default, (m,), (fake_value(m),), mode)
                masks.append(_canonical_mask(graph, m, match.score_roles, mode))
            # Unsorted, the op's columns come in the order its atomics filled the buffers, which may change from run
            # to run; under torch.use_deterministic_algorithms (a mode dynamo guards on) they come sorted instead,
            # one of the orders an unsorted top-k may return, and the same every run.
            in_order = plan.sorted or torch.are_deterministic_algorithms_enabled()
            args = (q, k, w, plan.k, False, float(match.scale), None, in_order, *masks)
            fake_args = tuple(a.meta["val"] if isinstance(a, fx.Node) else a for a in args)
            fused = sub._call(graph, torch.ops.fx_indexcache.indexer_topk_fused.default, args, fake_args, mode)
            idx = sub._call(graph, prims.convert_element_type.default, (fused, torch.int64),
                            (fused.meta["val"], torch.int64), mode)
            idx = sub._insert_steps(graph, idx, sub._restore_steps("bst", match.score_roles), mode)
        want = fake_value(next(u for u in plan.topk.users if u.args[1] == 1)) if plan.topk.users else None
        if want is not None and (tuple(idx.meta["val"].shape) != tuple(want.shape) or idx.meta["val"].dtype != want.dtype):
            raise RuntimeError(f"the fused indices {tuple(idx.meta['val'].shape)} {idx.meta['val'].dtype} are not the "
                               f"top-k's {tuple(want.shape)} {want.dtype}")
    take_provenance(fused, x)
    for u in list(plan.topk.users):
        if u.args[1] == 1:
            u.replace_all_uses_with(idx)
        graph.erase_node(u)
    dead = dead_if_removed([plan.topk])
    erase_dead(graph, dead)
    return len(dead)


def _canonical_mask(graph: fx.Graph, m: fx.Node, score_roles: tuple[str, ...], mode) -> fx.Node:
    """A mask in the score's layout (possibly fewer dims, broadcasting) re-viewed as ``[B|1, S|1, T|1]``."""
    from . import substitute as sub

    missing = len(score_roles) - fake_value(m).dim()
    steps = [(aten.unsqueeze.default, (0,))] * missing + sub._canonical_steps(score_roles, "bst")
    return sub._insert_steps(graph, m, steps, mode)
