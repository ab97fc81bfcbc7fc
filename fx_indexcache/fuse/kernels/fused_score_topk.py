"""Indexer score + top-k in one pass over the keys: only the indices are written, never the ``[S, T]`` logits.

``indexer_topk_fused(q, k, weights, topk, causal=, scale=, kv_lens=, sorted=)`` returns what
``indexer_topk(indexer_logits(q, k, weights, ...), topk)`` returns (int32 ``[B, S, min(topk, T)]``), for the
graphs that read only the indices: the logits of 1 x 1024 x 128K are 512 MB written and read back again, the
selected indices 8 MB. Argument conventions and masking are ``lightning_indexer``'s; two optional masks stand
for the masks a model applies between its score and its top-k (``fuse/substitute.py`` passes them on):
``bias`` (float, broadcastable to ``[B, S, T]``) is added to every visible key's score (an additive mask),
then ``drop`` (bool, broadcastable) sets the score of every key where it is True to -inf (``masked_fill``).

How (``_fused_score_topk_triton.py``; the plan of ``topk.py``'s row top-k, with the scoring inside):

1. **Sample.** The kernel scores the sampled keys of every row (``topk.plan``: ``NB`` blocks of ``SB``
   contiguous keys spread over the row, about 32 expected in the top k) into a small ``[R, NS]`` buffer,
   and the threshold ``L`` of a row is the ``R_SAMPLE``-th largest of them (a few standard deviations
   below the expected k-th key). Rows of at most ``CAP`` keys take every key (``L`` = the lowest key).
2. **Score and filter.** The scoring kernel (the logits kernel's tiles, prefill or decode layout) keeps
   each scored tile in registers and appends only each row's keys above ``L`` (key and index) to a per-row
   candidate buffer and the indices of keys equal to ``L`` to a tie buffer, places reserved by one atomic a
   (row, tile) after a prefix sum over the tile (``filter="scan"``, the default) or each kept key's from an
   atomic of its own on its row's counter (``"atomic"``). Nothing else is stored.
3. **Select** (a program a row; at batch 1 in decode, the scoring kernel's last program to finish, so no
   launch of its own): the exact k-th key among the candidates (``_kth_key``'s bitwise search), every key
   above it, then the lowest-indexed keys equal to it (a second bitwise search, over the indices: the
   buffers are in atomic order, not index order). If fewer than k keys lie above ``L``, all candidates and
   the lowest-indexed ties at ``L``; if those ties overflowed their buffer but every key not above ``L``
   ties at it (a masked tail), the lowest indices outside the candidates. ``sorted``: one packed sort of the
   k selected (key, index) pairs.
4. **Fallback** (the sample misled: fewer than k keys at or above ``L``, or more than the buffers hold):
   the row is scored again into a scratch row and the exact search of ``topk`` runs over it from memory.
   Slow, never wrong. Rows listed for it go to a fixed pool of programs (or, where the scratch of every row
   is small, the select program does it at once).

Everything stays on the device: fixed-size buffers allocated per call, launch shapes from the input shapes
only, no host synchronisation, so a CUDA graph captures it.

**What is promised.** The selected set is the exact top-k of the scores the kernel computes (the logits
kernels' arithmetic: bf16 products accumulated in fp32 per head, ReLU, weight, head sum in head order),
ties at the k-th score broken towards the lowest key index -- the rule of ``indexer_topk``'s Triton path.
Against ``indexer_topk(indexer_logits(...))`` the sets are therefore equal except where the two kernels'
scores round differently (their tiles may differ) and at exact ties where the other path picks differently
(torch.topk's choice is unspecified); a NaN with the sign bit set ranks as in ``topk.py`` (not promised).
``sorted=True``: descending score, equal scores by ascending index, -inf (masked) keys after every other.
``sorted=False``: the order of the columns is unspecified and may vary from run to run (the candidates
arrive in atomic order); the set does not.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Optional

import torch

from . import topk as _tk
from .lightning_indexer import (
    _registered,
    _visible_mask,
    head_tile,
    indexer_logits_reference,
    rule_config,
    triton_cdiv,
    unsupported_reason,
)

__all__ = [
    "FusedTopkConfig",
    "fused_unsupported_reason",
    "indexer_topk_fused",
    "indexer_topk_fused_reference",
]

#: Largest k (the select sorts and flags up to k entries in registers), as the row top-k.
MAX_K = _tk.MAX_K
#: The fallback scratch of every row is allocated (the select program rescores its own row at once) while it
#: holds at most this many fp32 scores (32 MB: decode batches); larger calls list their fallback rows for a
#: pool of ``FALLBACK_PROGRAMS`` programs with a scratch row each.
INLINE_FALLBACK_MAX_ELEMS = 1 << 23
FALLBACK_PROGRAMS = 32
#: Key block of the fallback's rescoring (decode layout, one query).
FALLBACK_BLOCK_T = 64
#: Path codes (``path=`` of ``_launch``): which way each row went.
PATHS = {0: "direct", 1: "candidates", 2: "threshold ties", 3: "fallback", 4: "masked tail"}


#: How the scoring kernel places a tile's kept keys (``FusedTopkConfig.filter``).
FILTERS = ("scan", "atomic")
#: The filter of a config that names none, and of ``default_fused_config``: the one whose GPU tests, CUDA-graph
#: replay included, have all passed on a card (the atomic one is faster and waits for that: docs/kernels.md).
DEFAULT_FILTER = "scan"


@dataclasses.dataclass(frozen=True)
class FusedTopkConfig:
    """Launch shape: the scoring layout and tiles (as ``LogitsConfig``) and the sample kernel's key block.

    kind "prefill": programs own ``block_s`` queries x ``block_t`` keys and loop over the heads.
    kind "decode": programs own ``block_s`` queries (looped) x ``block_t`` keys, heads on the M side.
    ``filter``: how a scored tile's kept keys find their places in the row's buffers: "scan" (a prefix sum over the
    tile, one atomic a row and tile: three more values a key, which cap its prefill tiles at 64 keys) or "atomic"
    (an atomic a kept key: past its flags a tile holds only its keys and places, so prefill tiles are as wide as
    the logits kernel's 256 keys; 0.59x the scan filter's time at 1 x 1024 x 128K on an H100, but not the default,
    ``DEFAULT_FILTER``, while a CUDA-graph replay test of it failed once on the card, unexplained: docs/kernels.md).
    """

    kind: str = "prefill"
    block_s: int = 64
    block_t: int = 128
    sample_block_t: int = 128
    num_warps: int = 8
    num_stages: int = 2
    select_warps: int = 8
    filter: str = DEFAULT_FILTER

    def __post_init__(self) -> None:
        if self.filter not in FILTERS:
            raise ValueError(f"FusedTopkConfig.filter={self.filter!r}: allowed {', '.join(FILTERS)}")

    def name(self) -> str:
        return (f"fused-{self.kind}-s{self.block_s}-t{self.block_t}-st{self.sample_block_t}-w{self.num_warps}"
                f"-ns{self.num_stages}-sel{self.select_warps}-{self.filter}")


def default_fused_config(B: int, S: int, T: int, H: int, D: int, device: Optional[torch.device] = None,
                         filter: str = DEFAULT_FILTER) -> FusedTopkConfig:
    """The logits kernel's rule tiles (``rule_config``) with ``filter``: prefill 64 queries x at most 64 keys on 8
    warps with the scan filter (its registers: 64 x 256 spills 1472 bytes a thread on sm_90), 64 x the rule's keys
    (256 at V3.2's head shape) with the atomic filter; decode the rule's decode tiles. The atomic launch is the
    faster (docs/kernels.md); a card's measured configs time the logits kernels, not this one."""
    if filter not in FILTERS:
        raise ValueError(f"default_fused_config: filter={filter!r}: allowed {', '.join(FILTERS)}")
    c = rule_config(B, S, T, H, D, device)
    if c.kind == "decode":
        return FusedTopkConfig("decode", c.block_s, c.block_t, 64, c.num_warps, c.num_stages, 4, filter=filter)
    block_t = c.block_t if filter == "atomic" else min(c.block_t, 64)
    return FusedTopkConfig("prefill", c.block_s, block_t, 128, 8, min(c.num_stages, 3), 8, filter=filter)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import _fused_score_topk_triton as kt

    return kt


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def fused_unsupported_reason(q, k, weights, topk: int, kv_lens=None, *, scale: float = 1.0, bias=None,
                             drop=None) -> Optional[str]:
    """Why ``indexer_topk_fused`` cannot take these inputs, or None (real or fake tensors, as
    ``lightning_indexer.unsupported_reason``, plus k, the row length and the masks)."""
    why = unsupported_reason(q, k, weights, kv_lens, scale=scale)
    if why is not None:
        return why
    return _shape_reason(q, k, topk, bias, drop)


def _shape_reason(q, k, topk, bias, drop) -> Optional[str]:
    try:
        T = k.shape[1]
        if isinstance(T, int) and T > _tk.MAX_ROW:
            return f"rows of {T} keys; the fused top-k takes at most {_tk.MAX_ROW}"
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            return f"topk={topk!r}: must be an int >= 1"
        if topk > MAX_K and not (isinstance(T, int) and T <= MAX_K):
            return f"topk={topk}: the fused top-k takes k <= {MAX_K}"
        for name, m, kinds in (("bias", bias, "floating"), ("drop", drop, "bool")):
            if m is None:
                continue
            if kinds == "bool" and m.dtype != torch.bool:
                return f"{name} must be a bool tensor (got {m.dtype})"
            if kinds == "floating" and not m.dtype.is_floating_point:
                return f"{name} must be a floating tensor (got {m.dtype})"
            if m.device != q.device:
                return f"{name} must be on q's device {q.device} (got {m.device})"
            try:
                torch.broadcast_shapes(tuple(m.shape), (q.shape[0], q.shape[1], T))
            except RuntimeError:
                return f"{name} of shape {tuple(m.shape)} does not broadcast to [B, S, T] = {[q.shape[0], q.shape[1], T]}"
            if m.dim() > 3:
                return f"{name} has {m.dim()} dims; at most 3 ([B, S, T])"
    except Exception as e:  # pragma: no cover - defensive: never let the predicate raise
        return f"check failed: {type(e).__name__}: {e}"
    return None


def indexer_topk_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    *,
    causal: bool = True,
    scale: float = 1.0,
    kv_lens: Optional[torch.Tensor] = None,
    sorted: bool = False,
    bias: Optional[torch.Tensor] = None,
    drop: Optional[torch.Tensor] = None,
    config: Optional[FusedTopkConfig] = None,
) -> torch.Tensor:
    """int32 indices ``[B, S, min(topk, T)]`` of each query's largest indexer scores, scored and selected in one
    pass without the logits (see the module doc for the masks, the tie rule and what is promised)."""
    why = fused_unsupported_reason(q, k, weights, topk, kv_lens, scale=scale, bias=bias, drop=drop)
    if why is not None:
        raise ValueError(f"indexer_topk_fused: unsupported inputs: {why}")
    if kv_lens is not None and kv_lens.shape[0] != q.shape[0]:
        raise ValueError(f"indexer_topk_fused: kv_lens has {kv_lens.shape[0]} entries; needs one per batch row "
                         f"({q.shape[0]})")
    B, S, T = q.shape[0], q.shape[1], k.shape[1]
    out = torch.empty((B, S, min(int(topk), T)), dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out
    with torch.cuda.device(q.device):
        _launch(q, k, weights, out, causal=bool(causal), scale=float(scale), kv_lens=kv_lens, sorted=bool(sorted),
                bias=bias, drop=drop, config=config)
    return out


def indexer_topk_fused_reference(q, k, weights, topk, *, causal=True, scale=1.0, kv_lens=None, sorted=False,
                                 bias=None, drop=None, dtype=torch.float32) -> torch.Tensor:
    """torch.topk over the reference logits with the masks applied as ``indexer_topk_fused`` applies them
    (torch's choice among exact ties: compare sets, tie-aware)."""
    return torch.topk(masked_reference_scores(q, k, weights, causal=causal, scale=scale, kv_lens=kv_lens, bias=bias,
                                              drop=drop, dtype=dtype),
                      min(int(topk), k.shape[1]), dim=-1, sorted=sorted).indices.to(torch.int32)


def masked_reference_scores(q, k, weights, *, causal=True, scale=1.0, kv_lens=None, bias=None, drop=None,
                            dtype=torch.float32) -> torch.Tensor:
    """The scores ``indexer_topk_fused`` selects from, in plain torch: ``indexer_logits_reference``, ``bias``
    added on visible keys, then ``drop`` -> -inf."""
    x = indexer_logits_reference(q, k, weights, causal=causal, scale=scale, kv_lens=kv_lens, dtype=dtype)
    if bias is not None:
        vis = _visible_mask(x.shape[0], x.shape[1], x.shape[2], causal, kv_lens, x.device)
        x = torch.where(vis, x + bias.to(dtype), x)
    if drop is not None:
        x = x.masked_fill(drop, float("-inf"))
    return x


def _mask_arg(m: Optional[torch.Tensor], B: int, S: int, T: int, dummy: torch.Tensor):
    """A mask as the kernels take it: the tensor expanded to ``[B, S, T]`` (stride 0 where broadcast; bool read
    as uint8) and its strides, or a dummy pointer and zero strides."""
    if m is None:
        return dummy, (0, 0, 0)
    m = m.reshape((1,) * (3 - m.dim()) + tuple(m.shape)).expand(B, S, T)
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return m, tuple(m.stride())


def _launch(q, k, weights, out, *, causal: bool, scale: float, kv_lens=None, sorted: bool = False, bias=None,
            drop=None, config: Optional[FusedTopkConfig] = None, cap: Optional[int] = None,
            sample: Optional[int] = None, tie_cap: Optional[int] = None, path: Optional[torch.Tensor] = None,
            select_last: Optional[bool] = None, fallback_inline: Optional[bool] = None,
            fallback_programs: Optional[int] = None):
    """Launch the fused kernels into ``out [B, S, K]`` (no input checks: callers check; runs under
    TRITON_INTERPRET too). Overrides for tests and benchmarks: ``cap`` / ``sample`` (as ``topk.plan``),
    ``tie_cap`` (tie buffer, default k rounded up to a power of two), ``select_last`` (the scoring kernel's
    last program selects; default: decode layout and one row), ``fallback_inline`` (default: while every
    row's scratch fits ``INLINE_FALLBACK_MAX_ELEMS``; always with ``select_last``), ``fallback_programs``.
    ``path`` (int32 ``[B * S]``) receives each row's path (``PATHS``)."""
    B, S, H, D = q.shape
    T = k.shape[1]
    K = out.shape[-1]
    R = B * S
    dev = q.device
    cfg = config or default_fused_config(B, S, T, H, D, dev)
    if cfg.kind not in ("decode", "prefill"):
        raise ValueError(f"FusedTopkConfig.kind={cfg.kind!r}; expected 'decode' or 'prefill'")
    decode = cfg.kind == "decode"
    p = _tk.plan(T, K, cap=cap, sample=sample)
    direct, CAP, KP = p["DIRECT"], p["CAP"], p["KP"]
    NB, SB = p["NB"], p["SB"]
    TCAP = _pow2(max(16, tie_cap or KP))
    block_s = max(1, min(cfg.block_s, S)) if decode else cfg.block_s
    s_groups = triton_cdiv(S, block_s)
    G = B * s_groups
    if select_last is None:
        select_last = decode and R <= _tk.SELECT_IN_WRITE_ROWS
    if select_last and not decode:
        raise ValueError("select_last=True needs the decode layout (FusedTopkConfig.kind='decode')")
    inline = bool(select_last or (fallback_inline if fallback_inline is not None else R * T <= INLINE_FALLBACK_MAX_ELEMS))
    block_h = head_tile(H)
    kern = _kernels()

    # one memset: per-row counters, the sample's and the filter's finished-program counts, the fallback count
    ctr = torch.zeros(R + 2 * G + 1, dtype=torch.int64, device=dev)
    cnt, sample_done, filter_done, fb_cnt = ctr[:R], ctr[R:R + G], ctr[R + G:R + 2 * G], ctr[R + 2 * G:]
    thr = torch.empty(R, dtype=torch.int32, device=dev)
    cand_key = torch.empty((R, CAP), dtype=torch.int32, device=dev)
    cand_idx = torch.empty((R, CAP), dtype=torch.int32, device=dev)
    ties = torch.empty((R, TCAP), dtype=torch.int32, device=dev)
    sel = torch.empty((R, 2 * KP), dtype=torch.int64, device=dev)
    if inline:
        fb = torch.empty((R, T), dtype=torch.float32, device=dev)
    else:
        fb = torch.empty(R, dtype=torch.int32, device=dev)
    out2d = out.view(R, K)
    kv_arg = kv_lens if kv_lens is not None else thr
    bias_arg, bias_st = _mask_arg(bias, B, S, T, thr)
    drop_arg, drop_st = _mask_arg(drop, B, S, T, thr)
    path_arg = path if path is not None else thr
    strides = (*q.stride(), *k.stride(), *weights.stride(), *bias_st, *drop_st)
    masks = dict(CAUSAL=causal, HAS_KVLEN=kv_lens is not None, HAS_BIAS=bias is not None, HAS_DROP=drop is not None)
    fence = not _interpreted()

    if not direct:
        ns = NB * SB
        sbt = min(cfg.sample_block_t, _pow2(ns))
        samp = torch.empty((R, ns), dtype=torch.float32, device=dev)
        kern._sample_kernel[(triton_cdiv(ns, sbt), s_groups, B)](
            q, k, weights, kv_arg, bias_arg, drop_arg, samp, thr, sample_done,
            S, T, H, scale, p["R_SAMPLE"], *strides[:16],
            **masks, D=D, DECODE=decode, BLOCK_S=block_s, BLOCK_T=sbt, BLOCK_H=block_h, NB=NB, SB=SB,
            THRESHOLD_LAST=decode, FENCE=fence, num_warps=cfg.num_warps if not decode else 4,
            num_stages=cfg.num_stages)
        if not decode:
            kern._threshold_kernel[(R,)](samp, thr, p["R_SAMPLE"], NS=ns, num_warps=4)
    common = (S, T, H, K, scale, *strides, out2d.stride(0), out2d.stride(1))
    consts = dict(**masks, D=D, BLOCK_H=block_h, FB_BLOCK_T=FALLBACK_BLOCK_T, CHUNK=p["CHUNK"], DIRECT=direct,
                  CAP=CAP, TCAP=TCAP, KP=KP, SORTED=bool(sorted), RECORD_PATH=path is not None)
    kern._score_filter_kernel[(triton_cdiv(T, cfg.block_t), s_groups, B)](
        q, k, weights, kv_arg, bias_arg, drop_arg, out2d, cnt, thr, cand_key, cand_idx, ties, sel, fb, fb_cnt,
        path_arg, filter_done, *common,
        **consts, DECODE=decode, BLOCK_S=block_s, BLOCK_T=cfg.block_t, SELECT_LAST=bool(select_last), FENCE=fence,
        ATOMIC_FILTER=cfg.filter == "atomic", num_warps=(cfg.select_warps if select_last else cfg.num_warps),
        num_stages=cfg.num_stages)
    if select_last:
        return
    kern._select_kernel[(R,)](
        q, k, weights, kv_arg, bias_arg, drop_arg, out2d, cnt, thr, cand_key, cand_idx, ties, sel, fb, fb_cnt,
        path_arg, *common, **consts, FALLBACK_INLINE=inline, num_warps=cfg.select_warps)
    if not inline:
        programs = max(1, min(R, fallback_programs or FALLBACK_PROGRAMS))
        scratch = torch.empty((programs, T), dtype=torch.float32, device=dev)
        consts = {k_: v for k_, v in consts.items() if k_ not in ("DIRECT", "CAP", "TCAP", "RECORD_PATH")}
        kern._fallback_kernel[(programs,)](
            q, k, weights, kv_arg, bias_arg, drop_arg, out2d, fb, fb_cnt, scratch, *common, **consts,
            num_warps=4)


# ----------------------------------------------------------------------------------------------
# Custom op, for graph passes: the kernels on supported CUDA inputs, the reference elsewhere
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _warn_fallback(why: str, inputs: str) -> None:
    """Once per reason and input shape: a fused score + top-k site that runs the reference on CUDA at run time."""
    from torch._dynamo.utils import counters

    counters["fx_indexcache"]["fused_op_reference_fallbacks"] += 1
    logging.getLogger(__name__).warning(
        "fx_indexcache::indexer_topk_fused runs its reference (fp32 einsum + torch.topk, slow) on CUDA inputs: %s "
        "(%s)", why, inputs)


def _topk_fused_any(q, k, weights, topk, causal, scale, kv_lens, sorted, bias, drop):
    why = fused_unsupported_reason(q, k, weights, topk, kv_lens, scale=scale, bias=bias, drop=drop)
    if why is None:
        return indexer_topk_fused(q, k, weights, topk, causal=causal, scale=scale, kv_lens=kv_lens, sorted=sorted,
                                  bias=bias, drop=drop)
    if q.is_cuda:  # the compile-time check let the site through, so this fallback is a surprise: say so
        _warn_fallback(why, f"q {q.dtype} {tuple(q.shape)}, k {k.dtype} {tuple(k.shape)}, topk {topk}")
    return indexer_topk_fused_reference(q, k, weights, topk, causal=causal, scale=scale, kv_lens=kv_lens,
                                        sorted=sorted, bias=bias, drop=drop)


def _define_topk_fused_op() -> None:
    """Define ``torch.ops.fx_indexcache.indexer_topk_fused(q, k, weights, topk, causal, scale, kv_lens, sorted,
    bias, drop)`` -> int32 ``[B, S, min(topk, T)]`` (idempotent): what the substitution inserts where an F
    layer's score feeds only its top-k's indices."""
    if _registered("indexer_topk_fused"):
        return
    from torch.library import custom_op

    @custom_op("fx_indexcache::indexer_topk_fused", mutates_args=())
    def _op(
        q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, topk: int, causal: bool, scale: float,
        kv_lens: Optional[torch.Tensor], sorted: bool, bias: Optional[torch.Tensor], drop: Optional[torch.Tensor],
    ) -> torch.Tensor:
        return _topk_fused_any(q, k, weights, topk, causal, scale, kv_lens, sorted, bias, drop)

    @_op.register_fake
    def _(q, k, weights, topk, causal, scale, kv_lens, sorted, bias, drop):
        return q.new_empty((q.shape[0], q.shape[1], torch.sym_min(topk, k.shape[1])), dtype=torch.int32)


_define_topk_fused_op()
