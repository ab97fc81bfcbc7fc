"""Fused lightning-indexer logits (Triton) and its top-k, for DeepSeek-Sparse-Attention indexers.

Math (DeepSeek-V3.2 indexer, transformers layout)::

    q        [B, S, H, D]   bf16 or fp16 (any strides)
    k        [B, T, D]      same dtype as q (any strides)
    weights  [B, S, H]      any float dtype (per-head weights, already scaled)
    logit[b, s, t] = sum_h weights[b, s, h] * relu(scale * <q[b, s, h, :], k[b, t, :]>)

``scale`` must be >= 0 (then ``relu(scale * x) == scale * relu(x)`` and the kernel folds it into the
weights). Query ``s`` sits at absolute position ``s + L_b - S`` where ``L_b`` is ``kv_lens[b]`` (or
``T`` when no lengths are given): key ``t`` is visible iff ``t < L_b`` and, when ``causal``,
``t <= s + L_b - S``. Invisible keys get ``-inf``. A query row that sees no key is all ``-inf``.

The Triton kernel never materialises ``[S, H, T]``: each program owns an (s-tile, t-tile) block of the
output, keeps the k tile on chip, loops over heads doing one bf16 tensor-core product per head with
fp32 accumulation, and applies ReLU, the head weight, the head sum and the mask in registers.
Blocks that the mask hides completely are written as ``-inf`` without any arithmetic. For a few
queries (decode) a second kernel puts the heads on the matrix unit's M side instead, so no
tensor-core work is wasted on padding rows.

Top-k (``indexer_topk``): CUDA fp32 rows go to ``topk.row_topk`` (a sampled threshold, a filtering
pass split over programs when rows are few, an exact select held on chip, an in-kernel sort when asked)
where it measured faster than ``torch.topk`` (``topk.faster_than_torch``: decode batches under CUDA-graph
capture on the Triton kernels; >= 256 rows of >= 8K keys on the CUDA C++ kernel where it loads, else of
16K-32K or > 128K keys on the Triton ones), others to ``torch.topk``
(measured against each other in ``benchmarks/bench_indexer_kernel.py``; see ``docs/kernels.md``). The result has ``min(topk, T)`` columns (as transformers'
indexer). Ties and ``-inf``: with ``sorted=True`` the columns are in descending score order, so masked
(``-inf``) keys come after every visible key; the Triton path also does so unsorted and breaks ties at
the k-th score towards the lowest key index (torch.topk's tie choice is unspecified).
``invalid_index=-1`` replaces the index of every selected ``-inf`` key, for consumers that want an
explicit marker.

``indexer_logits_rounded`` (and the op ``fx_indexcache::indexer_logits_rounded``) returns the same logits rounded
once to bf16/fp16 by the kernel's store, for graphs whose score is bf16/fp16 (docs/kernels_bf16.md).

fp8 scoring (``indexer_fp8``, opt-in): the same two kernels with ``KSCALE`` read float8 e4m3 q and k, do the
products on fp8 tensor cores and multiply each key's head sum by its per-token scale.

Triton is imported lazily: this module imports (and its reference runs) on a machine without CUDA
or Triton; ``is_supported`` says whether the fused kernel can take given inputs.
"""

import dataclasses
import functools
import json
import logging
import math
import re
from pathlib import Path
from typing import Optional

import torch

from . import programmatic_launch

__all__ = [
    "LogitsConfig",
    "default_config",
    "indexer_logits",
    "indexer_logits_reference",
    "indexer_logits_rounded",
    "indexer_topk",
    "is_supported",
    "lightning_indexer",
    "lightning_indexer_reference",
    "rule_config",
]

# Query count at or below which the decode kernel (heads on the M side) is used.
DECODE_MAX_S = 16


# ----------------------------------------------------------------------------------------------
# Triton, imported lazily
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _triton():
    """Import triton and build the kernels once; None when Triton is unusable here."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # pragma: no cover - depends on the machine
        return None
    return _build_kernels(triton, tl)


#: ``_topk_triton._count_bins``, which the key-rows kernel calls (its counts); bound by ``_build_kernels``: Triton
#: looks up a jit function's callees among its module's globals, and this module imports Triton only when it runs.
_count_bins = None
#: ``_programmatic_triton.programmatic_prologue``, which a programmatic launch of the kernels runs first; bound by
#: ``_build_kernels`` like ``_count_bins``.
_programmatic_prologue = None


def _build_kernels(triton, tl):
    """The logits kernels, jit-compiled on first launch (Triton is imported only when one runs)."""
    global _count_bins, _programmatic_prologue
    from ._programmatic_triton import AVAILABLE
    from ._programmatic_triton import programmatic_prologue as _programmatic_prologue
    from ._topk_triton import _count_bins

    return {"triton": triton, "prefill": _prefill_kernel(triton, tl), "decode": _decode_kernel(triton, tl),
            "key_rows": _key_rows_kernel(triton, tl), "programmatic": AVAILABLE}


def _prefill_kernel(triton, tl):
    """Prefill: one program per (key block, query block, batch row); a [BLOCK_S, BLOCK_T] tile per program."""
    @triton.jit
    def _logits_prefill_kernel(
        q_ptr, k_ptr, w_ptr, o_ptr, kvlen_ptr, ks_ptr,
        S, T, H, scale,
        sqb, sqs, sqh, sqd,
        skb, skt, skd,
        swb, sws, swh,
        sob, sos, sot,
        sksb,
        CAUSAL: tl.constexpr,
        HAS_KVLEN: tl.constexpr,
        KSCALE: tl.constexpr,
        D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_T: tl.constexpr,
        HEADS_PER_STEP: tl.constexpr,
        PDL: tl.constexpr,
    ):
        if PDL:  # a programmatic launch (programmatic_launch): wait for the kernel before, first thing
            _programmatic_prologue()
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        s0 = pid_s * BLOCK_S
        t0 = pid_t * BLOCK_T
        rs = s0 + tl.arange(0, BLOCK_S)
        rt = t0 + tl.arange(0, BLOCK_T)
        rd = tl.arange(0, D)
        if HAS_KVLEN:
            kv_len = tl.minimum(tl.maximum(tl.load(kvlen_ptr + b).to(tl.int32), 0), T)
        else:
            kv_len = T
        off = kv_len - S  # query s sits at absolute position s + off
        # exclusive upper bound of the keys any row of this tile can see
        t_hi = kv_len
        if CAUSAL:
            t_hi = tl.minimum(t_hi, s0 + BLOCK_S + off)
        rs64 = rs.to(tl.int64)
        o_ptrs = o_ptr + b * sob + rs64[:, None] * sos + rt.to(tl.int64)[None, :] * sot
        o_mask = (rs[:, None] < S) & (rt[None, :] < T)
        if t0 >= t_hi:
            ninf = tl.full([BLOCK_S, BLOCK_T], float("-inf"), tl.float32)
            tl.store(o_ptrs, ninf, mask=o_mask)
        else:
            k_ptrs = k_ptr + b * skb + rt.to(tl.int64)[:, None] * skt + rd[None, :] * skd
            kt = tl.load(k_ptrs, mask=rt[:, None] < T, other=0.0)
            kt_t = tl.trans(kt)
            s_ok = rs < S
            q_ptrs = q_ptr + b * sqb + rs64[:, None] * sqs + rd[None, :] * sqd
            w_ptrs = w_ptr + b * swb + rs64 * sws
            acc = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
            for h in range(0, H, HEADS_PER_STEP):
                qh = tl.load(q_ptrs + h * sqh, mask=s_ok[:, None], other=0.0)
                wh = tl.load(w_ptrs + h * swh, mask=s_ok, other=0.0).to(tl.float32) * scale
                d = tl.dot(qh, kt_t)
                if HEADS_PER_STEP == 2:  # both products issued before either epilogue: one can overlap the other
                    qh2 = tl.load(q_ptrs + (h + 1) * sqh, mask=s_ok[:, None], other=0.0)
                    wh2 = tl.load(w_ptrs + (h + 1) * swh, mask=s_ok, other=0.0).to(tl.float32) * scale
                    d2 = tl.dot(qh2, kt_t)
                    acc += tl.maximum(d, 0.0) * wh[:, None]
                    acc += tl.maximum(d2, 0.0) * wh2[:, None]
                else:
                    acc += tl.maximum(d, 0.0) * wh[:, None]
            if KSCALE:  # fp8 keys: the per-key scale (> 0) commutes with ReLU and the head sum
                acc = acc * tl.load(ks_ptr + b * sksb + rt, mask=rt < T, other=0.0)[None, :]
            valid = rt[None, :] < kv_len
            if CAUSAL:
                valid = valid & (rt[None, :] <= rs[:, None] + off)
            tl.store(o_ptrs, tl.where(valid, acc, float("-inf")), mask=o_mask)

    return _logits_prefill_kernel


def _decode_kernel(triton, tl):
    """Decode (few queries): one program per (KEY_BLOCKS key blocks, SQ queries, batch row); all heads as one tile.

    A program loops over its ``KEY_BLOCKS`` blocks of ``BLOCK_T`` keys, so the next block's keys load while this
    one's product runs (``num_stages``) and one query's q and weights are read once, not once a block. Blocks
    past the program's last visible key load nothing (masked) and store ``-inf``; a program with no visible key
    stores ``-inf`` without loading anything."""
    @triton.jit
    def _logits_decode_kernel(
        q_ptr, k_ptr, w_ptr, o_ptr, kvlen_ptr, ks_ptr,
        S, T, H, scale,
        sqb, sqs, sqh, sqd,
        skb, skt, skd,
        swb, sws, swh,
        sob, sos, sot,
        sksb,
        CAUSAL: tl.constexpr,
        HAS_KVLEN: tl.constexpr,
        KSCALE: tl.constexpr,
        D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_T: tl.constexpr,
        SQ: tl.constexpr,
        KEY_BLOCKS: tl.constexpr,
        PDL: tl.constexpr,
    ):
        if PDL:  # a programmatic launch (programmatic_launch): wait for the kernel before, first thing
            _programmatic_prologue()
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        t_first = pid_t * (KEY_BLOCKS * BLOCK_T)
        rd = tl.arange(0, D)
        rh = tl.arange(0, BLOCK_H)
        h_ok = rh < H
        if HAS_KVLEN:
            kv_len = tl.minimum(tl.maximum(tl.load(kvlen_ptr + b).to(tl.int32), 0), T)
        else:
            kv_len = T
        off = kv_len - S
        s_first = pid_s * SQ
        t_hi = kv_len
        if CAUSAL:
            t_hi = tl.minimum(t_hi, tl.minimum(s_first + SQ, S) + off)
        if t_first >= t_hi:
            ninf = tl.full([BLOCK_T], float("-inf"), tl.float32)
            for j in range(KEY_BLOCKS):
                rt = t_first + j * BLOCK_T + tl.arange(0, BLOCK_T)
                for i in range(SQ):
                    s = s_first + i
                    t_end = tl.where(s < S, T, 0)  # rows past S store nothing
                    tl.store(o_ptr + b * sob + s.to(tl.int64) * sos + rt.to(tl.int64) * sot, ninf, mask=rt < t_end)
        else:
            if SQ == 1:  # one query: its q and weights once for all the program's key blocks
                s_only = tl.minimum(s_first, S - 1).to(tl.int64)
                q_only = tl.load(q_ptr + b * sqb + s_only * sqs + rh[:, None] * sqh + rd[None, :] * sqd,
                                 mask=h_ok[:, None], other=0.0)
                w_only = tl.load(w_ptr + b * swb + s_only * sws + rh * swh, mask=h_ok, other=0.0).to(tl.float32) * scale
            for j in range(KEY_BLOCKS):
                rt = t_first + j * BLOCK_T + tl.arange(0, BLOCK_T)
                rt64 = rt.to(tl.int64)
                live = rt < t_hi  # keys past the last visible one are not read
                kt = tl.load(k_ptr + b * skb + rt64[:, None] * skt + rd[None, :] * skd, mask=live[:, None], other=0.0)
                kt_t = tl.trans(kt)
                if KSCALE:
                    k_scale = tl.load(ks_ptr + b * sksb + rt, mask=live, other=0.0)
                for i in range(SQ):
                    s = s_first + i
                    t_end = tl.where(s < S, T, 0)  # rows past S store nothing
                    s64 = tl.minimum(s, S - 1).to(tl.int64)  # and load a valid row
                    if SQ == 1:
                        qs = q_only
                        ws = w_only
                    else:
                        qs = tl.load(q_ptr + b * sqb + s64 * sqs + rh[:, None] * sqh + rd[None, :] * sqd,
                                     mask=h_ok[:, None], other=0.0)
                        ws = tl.load(w_ptr + b * swb + s64 * sws + rh * swh, mask=h_ok, other=0.0).to(tl.float32)
                        ws = ws * scale
                    d = tl.dot(qs, kt_t)
                    logit = tl.sum(tl.maximum(d, 0.0) * ws[:, None], axis=0)
                    if KSCALE:
                        logit = logit * k_scale
                    valid = rt < kv_len
                    if CAUSAL:
                        valid = valid & (rt <= s + off)
                    tl.store(
                        o_ptr + b * sob + s64 * sos + rt64 * sot,
                        tl.where(valid, logit, float("-inf")),
                        mask=rt < t_end,
                    )

    return _logits_decode_kernel


def _key_rows_kernel(triton, tl):
    """Prefill with the keys on the matrix unit's M side: one program per (key block, SQ queries, batch row).

    Each product is ``k_tile [BLOCK_T, D] @ q[NQ queries x BLOCK_H heads, D]^T``: NQ queries' heads side by side
    as its N columns. A thread holds a quarter of the head columns of its key rows (the rest are in the other
    three threads of its quad), so ReLU, the head weights and the head sum stay in registers plus two shuffles
    (the reshape to ``[BLOCK_T, NQ, BLOCK_H]`` moves no data), and no ``[BLOCK_S, BLOCK_T]`` accumulator lives
    across the loop: 55-127 registers where the "prefill" kernel takes about 200 (sm_90, Triton 3.6), so two to
    seven programs share an SM and one's ReLU and sums run under another's products (in one program they cannot:
    Triton waits for each product before its epilogue). On an H100 it agreed with the "prefill" kernel at every
    swept configuration, was not the fastest for fp8 prefill, and was the fastest for fp8 decode (docs/kernels.md).

    With ``KEY_BLOCKS > 1`` (one group of NQ queries a program: decode) a program loads its group's q and weights
    once and loops over its key blocks, so the next block's keys load while this one's product runs; keys past
    the group's last visible one are not read.

    With ``COUNT_BINS`` each key it computes is also counted into its row's bin (``topk_cuda.row_bins``: the top-k's
    key >> ROW_BIN_SHIFT, ROW_BINS a row, rows b * S + s), so a top-k can take its threshold from the counts
    instead of a sample. Keys stored as -inf without a product (query groups or key blocks that see none) are not
    counted: counts only steer the top-k, and those keys lie below every computed one."""
    @triton.jit
    def _logits_key_rows_kernel(
        q_ptr, k_ptr, w_ptr, o_ptr, kvlen_ptr, ks_ptr,
        S, T, H, scale,
        sqb, sqs, sqh, sqd,
        skb, skt, skd,
        swb, sws, swh,
        sob, sos, sot,
        sksb,
        bins_ptr,
        CAUSAL: tl.constexpr,
        HAS_KVLEN: tl.constexpr,
        KSCALE: tl.constexpr,
        D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_T: tl.constexpr,
        SQ: tl.constexpr,
        NQ: tl.constexpr,
        KEY_BLOCKS: tl.constexpr,
        COUNT_BINS: tl.constexpr,
        ROW_BINS: tl.constexpr,
        ROW_BIN_SHIFT: tl.constexpr,
        PDL: tl.constexpr,
    ):
        if PDL:  # a programmatic launch (programmatic_launch): wait for the kernel before, first thing
            _programmatic_prologue()
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rd = tl.arange(0, D)
        rn = tl.arange(0, NQ * BLOCK_H)  # product column: query rn // BLOCK_H of the group, head rn % BLOCK_H
        n_q = rn // BLOCK_H
        n_h = rn % BLOCK_H
        rq = tl.arange(0, NQ)
        if HAS_KVLEN:
            kv_len = tl.minimum(tl.maximum(tl.load(kvlen_ptr + b).to(tl.int32), 0), T)
        else:
            kv_len = T
        off = kv_len - S
        s_first = pid_s * SQ
        if KEY_BLOCKS == 1:
            t0 = pid_t * BLOCK_T
            rt = t0 + tl.arange(0, BLOCK_T)
            rt64 = rt.to(tl.int64)
            s_end = tl.minimum(s_first + SQ, S)
            # the first query of this program that sees a key of the block; groups before its group see none, and
            # get -inf without a product, so the loop that multiplies has no branch (Triton pipelines its loads)
            s_sees = s_first
            if CAUSAL:
                s_sees = tl.maximum(s_sees, t0 - off)
            if t0 >= kv_len:
                s_sees = s_end
            g_first = s_first + (tl.minimum(s_sees, s_end) - s_first) // NQ * NQ
            o_keys = o_ptr + b * sob + rt64[:, None] * sot  # [BLOCK_T, 1]: add a group's rows
            t_in = rt[:, None] < T
            for s0 in range(s_first, g_first, NQ):
                s_rows = s0 + rq
                tl.store(o_keys + s_rows.to(tl.int64)[None, :] * sos, tl.full([BLOCK_T, NQ], float("-inf"), tl.float32),
                         mask=t_in & (s_rows[None, :] < S))
            kt = tl.load(k_ptr + b * skb + rt64[:, None] * skt + rd[None, :] * skd, mask=rt[:, None] < T, other=0.0)
            if KSCALE:
                k_scale = tl.load(ks_ptr + b * sksb + rt, mask=rt < T, other=0.0)
            for s0 in range(g_first, s_end, NQ):
                s_rows = s0 + rq  # [NQ]
                s_col = tl.minimum(s0 + n_q, S - 1).to(tl.int64)  # a valid row for columns past S
                col_ok = (n_h < H) & (s0 + n_q < S)
                q_ptrs = q_ptr + b * sqb + s_col[:, None] * sqs + n_h[:, None] * sqh + rd[None, :] * sqd
                qg = tl.load(q_ptrs, mask=col_ok[:, None], other=0.0)
                wg = tl.load(w_ptr + b * swb + s_col * sws + n_h * swh, mask=col_ok, other=0.0)
                wg = wg.to(tl.float32) * scale
                d = tl.dot(kt, tl.trans(qg))
                x = tl.maximum(d, 0.0) * wg[None, :]
                logit = tl.sum(tl.reshape(x, [BLOCK_T, NQ, BLOCK_H]), axis=2)
                if KSCALE:
                    logit = logit * k_scale[:, None]
                valid = rt[:, None] < kv_len
                if CAUSAL:
                    valid = valid & (rt[:, None] <= s_rows[None, :] + off)
                logit = tl.where(valid, logit, float("-inf"))
                stored = t_in & (s_rows[None, :] < S)
                tl.store(o_keys + s_rows.to(tl.int64)[None, :] * sos, logit, mask=stored)
                if COUNT_BINS:
                    _count_bins(bins_ptr, (b * S + s_rows.to(tl.int64))[None, :], logit, stored, ROW_BINS, ROW_BIN_SHIFT)

        else:  # one group of NQ queries (decode): its q and weights once, then a loop over KEY_BLOCKS key blocks
            s0 = s_first  # SQ == NQ
            t_first = pid_t * (KEY_BLOCKS * BLOCK_T)
            s_rows = s0 + rq
            t_hi = kv_len  # past the group's last visible key nothing is read
            if CAUSAL:
                t_hi = tl.minimum(t_hi, tl.minimum(s0 + NQ, S) + off)
            row_ok = s_rows[None, :] < S
            if t_first >= t_hi:
                for j in range(KEY_BLOCKS):
                    rt = t_first + j * BLOCK_T + tl.arange(0, BLOCK_T)
                    tl.store(o_ptr + b * sob + rt.to(tl.int64)[:, None] * sot + s_rows.to(tl.int64)[None, :] * sos,
                             tl.full([BLOCK_T, NQ], float("-inf"), tl.float32), mask=(rt[:, None] < T) & row_ok)
            else:
                s_col = tl.minimum(s0 + n_q, S - 1).to(tl.int64)  # a valid row for columns past S
                col_ok = (n_h < H) & (s0 + n_q < S)
                qg = tl.load(q_ptr + b * sqb + s_col[:, None] * sqs + n_h[:, None] * sqh + rd[None, :] * sqd,
                             mask=col_ok[:, None], other=0.0)
                wg = tl.load(w_ptr + b * swb + s_col * sws + n_h * swh, mask=col_ok, other=0.0).to(tl.float32) * scale
                for j in range(KEY_BLOCKS):
                    rt = t_first + j * BLOCK_T + tl.arange(0, BLOCK_T)
                    rt64 = rt.to(tl.int64)
                    live = rt < t_hi
                    kt = tl.load(k_ptr + b * skb + rt64[:, None] * skt + rd[None, :] * skd, mask=live[:, None],
                                 other=0.0)
                    d = tl.dot(kt, tl.trans(qg))
                    x = tl.maximum(d, 0.0) * wg[None, :]
                    logit = tl.sum(tl.reshape(x, [BLOCK_T, NQ, BLOCK_H]), axis=2)
                    if KSCALE:
                        logit = logit * tl.load(ks_ptr + b * sksb + rt, mask=live, other=0.0)[:, None]
                    valid = rt[:, None] < kv_len
                    if CAUSAL:
                        valid = valid & (rt[:, None] <= s_rows[None, :] + off)
                    logit = tl.where(valid, logit, float("-inf"))
                    stored = (rt[:, None] < T) & row_ok
                    tl.store(o_ptr + b * sob + rt64[:, None] * sot + s_rows.to(tl.int64)[None, :] * sos, logit,
                             mask=stored)
                    if COUNT_BINS:
                        _count_bins(bins_ptr, (b * S + s_rows.to(tl.int64))[None, :], logit, stored, ROW_BINS,
                                    ROW_BIN_SHIFT)

    return _logits_key_rows_kernel


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


#: Kernels a ``LogitsConfig`` can launch.
CONFIG_KINDS = ("prefill", "decode", "key_rows")


@dataclasses.dataclass(frozen=True)
class LogitsConfig:
    """Launch shape of the logits kernel.

    kind "prefill": programs own BLOCK_S queries x BLOCK_T keys, loop over heads, ``heads_per_step`` at a time (2:
    the second head's product is issued before the first's ReLU and weighted sum, so the matrix unit need not wait
    for them; a head count it does not divide runs one at a time).
    kind "decode": programs own ``block_s`` queries (looped) x ``key_blocks`` blocks of BLOCK_T keys (looped: the
    next block loads while this one computes), heads on the M side.
    kind "key_rows": programs own ``block_s`` queries (looped, ``queries_per_dot`` at a time) x BLOCK_T keys, the
    keys on the M side and those queries' heads on the N side (prefill with a small register footprint); with
    one group of queries a program (``block_s == queries_per_dot``, decode) also ``key_blocks`` blocks, looped.
    """

    kind: str = "prefill"
    block_s: int = 128
    block_t: int = 128
    num_warps: int = 8
    num_stages: int = 3
    queries_per_dot: int = 1
    key_blocks: int = 1
    heads_per_step: int = 1

    def __post_init__(self) -> None:
        if self.kind not in CONFIG_KINDS:
            raise ValueError(f"LogitsConfig.kind={self.kind!r}: allowed {', '.join(CONFIG_KINDS)}")
        for field in ("block_s", "block_t", "num_warps", "num_stages", "queries_per_dot", "key_blocks",
                      "heads_per_step"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LogitsConfig.{field}={value!r}: must be a positive int")
        per_dot = self.queries_per_dot
        if per_dot & (per_dot - 1) or (self.kind == "key_rows" and self.block_s % per_dot):
            raise ValueError(f"LogitsConfig.queries_per_dot={per_dot}: must be a power of two dividing "
                             f"block_s={self.block_s}")
        if self.key_blocks > 1 and not (self.kind == "decode" or (self.kind == "key_rows" and self.block_s == per_dot)):
            raise ValueError(f"LogitsConfig.key_blocks={self.key_blocks}: kind 'decode', or 'key_rows' with one group "
                             f"of queries a program (block_s == queries_per_dot), loops over key blocks; kind="
                             f"{self.kind!r} with block_s={self.block_s} takes 1")
        if self.heads_per_step not in (1, 2) or (self.heads_per_step > 1 and self.kind != "prefill"):
            raise ValueError(f"LogitsConfig.heads_per_step={self.heads_per_step!r}: 1, or 2 for kind 'prefill' "
                             f"(kind={self.kind!r})")

    def name(self) -> str:
        per_dot = f"-q{self.queries_per_dot}" if self.kind == "key_rows" else ""
        blocks = f"-k{self.key_blocks}" if self.key_blocks > 1 else ""
        heads = f"-h{self.heads_per_step}" if self.heads_per_step > 1 else ""
        return (f"{self.kind}-s{self.block_s}-t{self.block_t}{per_dot}{blocks}{heads}-w{self.num_warps}"
                f"-st{self.num_stages}")


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


#: Measured launch configurations per card (``benchmarks/sweep_logits_configs.py`` writes them).
TUNED_CONFIGS = Path(__file__).resolve().with_name("configs")


def card_file_name(device_name: str) -> str:
    """``logits_configs_<card>.json``, the card's name with every run of other characters as one ``_``."""
    return "logits_configs_" + re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


@functools.lru_cache(maxsize=8)
def _tuned_rows(directory: Path, device_name: str) -> tuple[dict, ...]:
    path = directory / card_file_name(device_name)
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text()).get("rows", ()))


#: The shape kinds a card's measurements are kept for: the contiguous kernels' prefill and decode, and the paged
#: decode kernel (``paged_decode``), whose rows hold a configuration of one of its ``PAGED_KINDS``.
TUNED_KINDS = ("prefill", "decode", "paged")


def tuned_config(precision: str, B: int, S: int, T: int, H: int, D: int, device_name: str,
                 directory: Path = TUNED_CONFIGS, kind: Optional[str] = None) -> Optional[LogitsConfig]:
    """The fastest configuration measured on ``device_name`` for the nearest shape of the same kind and precision
    (nearest in log2 of the keys and of the query rows), or None where that card has no measurements. ``kind``:
    one of ``TUNED_KINDS``, by default "decode" up to ``DECODE_MAX_S`` queries, else "prefill". The sweep
    measured V3.2's indexer (64 heads x 128): other head counts and dims keep the rules."""
    if kind is None:
        kind = "decode" if S <= DECODE_MAX_S else "prefill"
    if kind not in TUNED_KINDS:
        raise ValueError(f"tuned_config: kind={kind!r}, allowed {', '.join(TUNED_KINDS)}")
    if (H, D) != (64, 128):
        return None
    rows = [r for r in _tuned_rows(directory, device_name) if r.get("precision") == precision and r.get("kind") == kind]
    if not rows:
        return None

    def distance(row: dict) -> float:
        return abs(math.log2(row["T"] / T)) + abs(math.log2(row["B"] * row["S"] / (B * S)))

    return LogitsConfig(**min(rows, key=distance)["best"])


def default_config(B: int, S: int, T: int, H: int, D: int, device: Optional[torch.device] = None,
                   precision: str = "bf16") -> LogitsConfig:
    """The launch configuration used when none is given: the card's measured one (``measured_config``) where it has
    measurements, else rules picked from measurements on an H100 (``rule_config``, see docs/kernels.md)."""
    measured = measured_config(precision, B, S, T, H, D, device)
    return measured if measured is not None else rule_config(B, S, T, H, D, device, precision)


def measured_config(precision: str, B: int, S: int, T: int, H: int, D: int, device: Optional[torch.device] = None,
                    kind: Optional[str] = None) -> Optional[LogitsConfig]:
    """``tuned_config`` for the card that ``device`` names (None off CUDA or where that card has no measurements),
    fitted to this shape's rows by ``fill_the_card``. ``kind`` as in ``tuned_config`` ("paged": ``paged_decode``'s
    rows)."""
    try:
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else None
    except Exception:  # no usable device here
        return None
    tuned = None if name is None else tuned_config(precision, B, S, T, H, D, name, kind=kind)
    if tuned is None:
        return None
    sms = device_sms(device)
    fitted = fill_the_card(tuned, B * math.ceil(S / max(1, min(tuned.block_s, S))), T, sms)
    if kind is None and S == 1 and device is not None and programmatic_launch.allowed(device):
        fitted = leave_the_top_k_its_sms(fitted, B, T, sms)
    return fitted


#: Programs an SM that the decode launch keeps at least, where its rows are short (the rules' threshold too).
MIN_PROGRAMS_PER_SM = 2


def fill_the_card(config: LogitsConfig, rows: int, T: int, sms: int) -> LogitsConfig:
    """``config`` with its key blocks a program halved until ``rows`` rows of ``T`` keys give every SM
    ``MIN_PROGRAMS_PER_SM`` programs (or one block a program is left). The sweep measured key blocks on rows of
    32K-128K keys; a short row with eight blocks a program would leave most of the card idle."""
    blocks = config.key_blocks
    while blocks > 1 and rows * math.ceil(T / (config.block_t * blocks)) < MIN_PROGRAMS_PER_SM * sms:
        blocks //= 2
    return config if blocks == config.key_blocks else dataclasses.replace(config, key_blocks=blocks)


def leave_the_top_k_its_sms(config: LogitsConfig, rows: int, T: int, sms: int) -> LogitsConfig:
    """``config`` with its key blocks a program doubled where that leaves one SM free for each of the ``rows`` blocks
    of the top-k after it, and halving the programs is enough for that (a launch just over one wave).

    Under programmatic launch (``programmatic_launch``) a decode top-k (one block a row) is scheduled while the
    logits kernel still runs only where an SM has room for its block; a logits launch that fills every SM delays it
    to the logits' tail, and the launch overlap buys nothing. On an H100 (torch 2.11, Triton 3.6), logits + top-k at
    B1 x 32K in CUDA-graph replay, five medians each: 18.6 us with 256 programs of one 128-key block, with or
    without programmatic launch; 18.0 us with 128 programs of two blocks and programmatic launch (18.7 without)."""
    free = sms - rows
    programs = rows * math.ceil(T / (config.block_t * config.key_blocks))
    doubled = rows * math.ceil(T / (config.block_t * config.key_blocks * 2))
    if free <= 0 or programs <= free or doubled > free:
        return config
    return dataclasses.replace(config, key_blocks=config.key_blocks * 2)


def device_sms(device: Optional[torch.device]) -> int:
    """Streaming multiprocessors of ``device`` (the current CUDA device when None), or an H100's 132 without one."""
    try:
        return _num_sms(device.index if device is not None and device.index is not None else torch.cuda.current_device())
    except Exception:  # no usable device: an H100's count
        return 132


def rule_config(B: int, S: int, T: int, H: int, D: int, device: Optional[torch.device] = None,
                precision: str = "bf16") -> LogitsConfig:
    """The launch configuration the rules give, whatever a card's measurements say (see docs/kernels.md): picked
    from bf16 measurements on an H100; fp8 at V3.2's head shape (up to 64 heads of up to 128) from the H100's fp8
    sweeps, where the bf16 tiles took 1.19x (prefill) and 1.01-1.26x (decode) the time of these. ``precision="bf16"``
    (the default, which the fused score + top-k uses) gives a "prefill" or "decode" kernel only."""
    fp8_tiles = precision == "fp8" and H <= 64 and D <= 128
    if S <= DECODE_MAX_S:
        if fp8_tiles:  # keys on the M side, one query's heads on N: the H100's fastest fp8 decode at 1-64 rows
            return LogitsConfig(kind="key_rows", block_s=1 if S <= 8 else 4, block_t=128, num_warps=4, num_stages=1)
        sms = device_sms(device)
        block_t = 128
        if B * math.ceil(T / 128) < 2 * sms:
            block_t = 64
        return LogitsConfig(kind="decode", block_s=1 if S <= 8 else 4, block_t=block_t, num_warps=4, num_stages=2)
    if D > 128 or fp8_tiles:
        return LogitsConfig(kind="prefill", block_s=64, block_t=128, num_warps=4, num_stages=3 if fp8_tiles else 2)
    return LogitsConfig(kind="prefill", block_s=64, block_t=256, num_warps=8, num_stages=4)


# ----------------------------------------------------------------------------------------------
# Support predicate
# ----------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _static_int(x) -> Optional[int]:
    try:
        return int(x) if isinstance(x, int) else None
    except Exception:
        return None


def unsupported_reason(q, k, weights, kv_lens=None, *, scale: float = 1.0) -> Optional[str]:
    """Why the fused kernel cannot take these inputs, or None when it can.

    Works on real and fake (meta / FakeTensor) tensors; sizes may be symbolic except H and D.
    """
    try:
        if q.dim() != 4 or k.dim() != 3 or weights.dim() != 3:
            return "expects q [B,S,H,D], k [B,T,D], weights [B,S,H]"
        if q.device.type != "cuda" or k.device != q.device or weights.device != q.device:
            return "inputs must all be on one CUDA device"
        if q.dtype not in _KERNEL_DTYPES or k.dtype != q.dtype:
            return f"q and k must both be bf16 or fp16 (got {q.dtype}, {k.dtype})"
        if not weights.dtype.is_floating_point:
            return "weights must be floating point"
        H, D = _static_int(q.shape[2]), _static_int(q.shape[3])
        if H is None or D is None:
            return "head count and head dim must be static"
        if D < 16 or D > 256 or (D & (D - 1)) != 0:
            return f"head dim {D} must be a power of two in [16, 256]"
        if H < 1 or H > 256:
            return f"head count {H} must be in [1, 256]"
        if _static_int(k.shape[2]) != D:
            return "k's last dim must equal q's head dim"
        for a, bb, what in ((q.shape[0], k.shape[0], "batch of k"), (q.shape[0], weights.shape[0], "batch of weights"),
                            (q.shape[1], weights.shape[1], "S of weights"), (q.shape[2], weights.shape[2], "H of weights")):
            if _static_int(a) is not None and _static_int(bb) is not None and a != bb:
                return f"{what} does not match q"
        if kv_lens is not None:
            if kv_lens.dim() != 1 or kv_lens.device != q.device or kv_lens.dtype not in (torch.int32, torch.int64):
                return "kv_lens must be a 1-D int32/int64 tensor on q's device"
        if not (scale >= 0.0):
            return "scale must be >= 0 (it is folded into the weights past the ReLU)"
        if (q.requires_grad or k.requires_grad or weights.requires_grad) and torch.is_grad_enabled():
            return "the kernel has no backward"
        if _triton() is None:
            return "Triton is not importable"
        major, _ = torch.cuda.get_device_capability(q.device)
        if major < 8:
            return "needs compute capability >= 8.0"
    except Exception as e:  # pragma: no cover - defensive: never let the predicate raise
        return f"check failed: {type(e).__name__}: {e}"
    return None


def is_supported(q, k, weights, kv_lens=None, *, scale: float = 1.0) -> bool:
    """True when ``indexer_logits`` can run the fused Triton kernel on these inputs."""
    return unsupported_reason(q, k, weights, kv_lens, scale=scale) is None


# ----------------------------------------------------------------------------------------------
# Logits
# ----------------------------------------------------------------------------------------------


def indexer_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    causal: bool = True,
    scale: float = 1.0,
    kv_lens: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    config: Optional[LogitsConfig] = None,
    bins: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Masked indexer logits ``[B, S, T]`` fp32 through the fused Triton kernel (see module doc).

    ``bins`` (int32 ``[B * S, topk_cuda.ROW_BINS]``, contiguous, zeroed by the caller; a "key_rows" config): each
    computed key is also counted into its row's bin, for a top-k that takes its threshold from the counts
    (``topk_cuda.launch(bins=...)``) instead of sampling the row."""
    why = unsupported_reason(q, k, weights, kv_lens, scale=scale)
    if why is not None:
        raise ValueError(f"indexer_logits: unsupported inputs: {why}")
    B, S, T = q.shape[0], q.shape[1], k.shape[1]
    if out is not None and (out.shape != (B, S, T) or out.dtype != torch.float32 or out.device != q.device):
        raise ValueError(f"out must be fp32 [{B}, {S}, {T}] on {q.device}")
    if kv_lens is not None and kv_lens.shape[0] != B:
        raise ValueError("kv_lens must have one entry per batch row")
    if bins is not None:
        from .topk_cuda import check_bins

        check_bins(bins, B * S, q.device, "indexer_logits")
        if config is None or config.kind != "key_rows":
            raise ValueError(f"bins are counted by a config of kind 'key_rows' (pass config=), got config={config}")
    return launch_into(q, k, weights, out, causal, scale, kv_lens, config, bins=bins)


def launch_into(q, k, weights, out, causal, scale, kv_lens, config, k_scale=None, bins=None) -> torch.Tensor:
    """Logits ``[B, S, T]`` into ``out`` (allocated fp32 when None) on q's device, the config defaulted by shape;
    no checks (the bf16 and fp8 entry points check their own inputs first). An ``out`` of bf16 or fp16 gets
    the fp32 result rounded to nearest even by the kernel's store (Triton casts a stored value to the
    pointer's type): what ``indexer_logits_rounded`` returns."""
    B, S, H, D = q.shape
    T = k.shape[1]
    if out is None:
        out = torch.empty((B, S, T), dtype=torch.float32, device=q.device)
    if B == 0 or S == 0 or T == 0:
        return out
    cfg = config or default_config(B, S, T, H, D, q.device, "bf16" if k_scale is None else "fp8")
    with torch.cuda.device(q.device):
        _launch(q, k, weights, out, bool(causal), float(scale), kv_lens, cfg, k_scale=k_scale, bins=bins)
    return out


def _launch(q, k, weights, out, causal: bool, scale: float, kv_lens, cfg: LogitsConfig, k_scale=None, bins=None):
    """Launch the logits kernel (no input checks: callers check; also used under TRITON_INTERPRET).

    ``k_scale`` (fp32 ``[B, T]``, unit stride over T): q and k are float8 e4m3 and each key's logit is
    multiplied by its scale (``indexer_fp8``). ``bins`` (int32 ``[B * S, topk_cuda.ROW_BINS]``, contiguous; kind
    "key_rows" only): the computed keys are counted into it (added: the caller zeroes it). Returns Triton's handle
    of the compiled kernel (registers, spills, PTX: see the benchmark).
    """
    B, S, H, D = q.shape
    T = k.shape[1]
    if bins is not None and cfg.kind != "key_rows":
        raise ValueError(f"bins are counted by kind 'key_rows' launches only, got LogitsConfig.kind={cfg.kind!r}")
    kern = _triton()
    kv_arg = kv_lens if kv_lens is not None else out  # dummy pointer when unused
    ks_arg = k_scale if k_scale is not None else out
    args = (
        q, k, weights, out, kv_arg, ks_arg,
        S, T, H, scale,
        *q.stride(), *k.stride(), *weights.stride(), *out.stride(),
        k_scale.stride(0) if k_scale is not None else 0,
    )
    block_h = head_tile(H)
    # a programmatic launch (programmatic_launch: the kernels wait for the grid before them first thing) in decode,
    # where the launch gap is a measurable part of the step; prefill launches stay plain (not measured)
    programmatic = kern["programmatic"] and S <= DECODE_MAX_S and programmatic_launch.allowed(q.device)
    pdl = dict(PDL=True, launch_pdl=True) if programmatic else dict(PDL=False)
    if cfg.kind == "decode":
        sq = max(1, min(cfg.block_s, S))
        grid = (triton_cdiv(T, cfg.block_t * cfg.key_blocks), triton_cdiv(S, sq), B)
        return kern["decode"][grid](
            *args,
            CAUSAL=causal, HAS_KVLEN=kv_lens is not None, KSCALE=k_scale is not None, D=D,
            BLOCK_H=block_h, BLOCK_T=cfg.block_t, SQ=sq, KEY_BLOCKS=cfg.key_blocks,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
        )
    elif cfg.kind == "key_rows":
        from .topk_cuda import ROW_BIN_SHIFT, ROW_BINS

        nq = cfg.queries_per_dot
        sq = max(nq, min(cfg.block_s, triton_cdiv(S, nq) * nq))
        grid = (triton_cdiv(T, cfg.block_t * cfg.key_blocks), triton_cdiv(S, sq), B)
        return kern["key_rows"][grid](
            *args, bins if bins is not None else out,
            CAUSAL=causal, HAS_KVLEN=kv_lens is not None, KSCALE=k_scale is not None, D=D,
            BLOCK_H=block_h, BLOCK_T=cfg.block_t, SQ=sq, NQ=nq, KEY_BLOCKS=cfg.key_blocks,
            COUNT_BINS=bins is not None, ROW_BINS=ROW_BINS, ROW_BIN_SHIFT=ROW_BIN_SHIFT,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
        )
    elif cfg.kind == "prefill":
        grid = (triton_cdiv(T, cfg.block_t), triton_cdiv(S, cfg.block_s), B)
        return kern["prefill"][grid](
            *args,
            CAUSAL=causal, HAS_KVLEN=kv_lens is not None, KSCALE=k_scale is not None, D=D,
            BLOCK_S=cfg.block_s, BLOCK_T=cfg.block_t,
            HEADS_PER_STEP=cfg.heads_per_step if H % cfg.heads_per_step == 0 else 1,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
        )
    else:
        raise ValueError(f"unknown config kind {cfg.kind!r}")


def head_tile(H: int) -> int:
    """The heads as one side of a matrix-unit tile (the decode, key-rows, paged and fused kernels): the next power
    of two, at least 16, the smallest side ``tl.dot`` takes."""
    return max(16, 1 << (H - 1).bit_length())


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _visible_mask(B: int, S: int, T: int, causal: bool, kv_lens, device) -> torch.Tensor:
    """[B, S, T] bool: key t visible to query s (see module doc)."""
    t = torch.arange(T, device=device)
    s = torch.arange(S, device=device)
    if kv_lens is None:
        L = torch.full((B,), T, device=device, dtype=torch.long)
    else:
        L = kv_lens.to(device=device, dtype=torch.long).clamp(0, T)
    vis = t.view(1, 1, T) < L.view(B, 1, 1)
    if causal:
        vis = vis & (t.view(1, 1, T) <= s.view(1, S, 1) + (L - S).view(B, 1, 1))
    return vis


def indexer_logits_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    causal: bool = True,
    scale: float = 1.0,
    kv_lens: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
    chunk_elems: int = 1 << 26,
) -> torch.Tensor:
    """Plain-torch logits in ``dtype`` (fp32 or fp64) from the upcast inputs, chunked over queries.

    Computes exactly ``sum_h w * relu(scale * q.k)`` (no assumption on the sign of ``scale``);
    returns ``[B, S, T]`` in ``dtype`` with ``-inf`` at invisible keys.
    """
    B, S, H, D = q.shape
    T = k.shape[1]
    kf = k.to(dtype)
    out = torch.empty((B, S, T), dtype=dtype, device=q.device)
    step = max(1, chunk_elems // max(1, H * T))
    for s0 in range(0, S, step):
        s1 = min(S, s0 + step)
        qf = q[:, s0:s1].to(dtype)
        wf = weights[:, s0:s1].to(dtype)
        sc = torch.relu(torch.einsum("bshd,btd->bsht", qf, kf) * scale)
        out[:, s0:s1] = torch.einsum("bsht,bsh->bst", sc, wf)
    vis = _visible_mask(B, S, T, causal, kv_lens, q.device)
    return out.masked_fill_(~vis, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Top-k
# ----------------------------------------------------------------------------------------------


def indexer_topk(
    logits: torch.Tensor,
    topk: int,
    *,
    sorted: bool = True,
    invalid_index: Optional[int] = None,
    method: str = "auto",
) -> torch.Tensor:
    """int32 indices ``[..., min(topk, T)]`` of the largest logits along the last dim.

    ``method``: "triton" (our kernels, ``topk.row_topk``: sampled threshold, one filtering pass, exact select
    on chip; CUDA fp32, k <= 8192; the CUDA C++ kernel for ``topk.CUDA_MIN_ROWS`` rows or more where it loads,
    else the Triton ones), "torch" (``torch.topk``) or "auto": ours where it applies and measured faster
    (``topk.faster_than_torch``; while a CUDA graph is being captured, by the graph-replay measurement, so
    the eager warm-up of Inductor's cudagraph trees may take torch.topk and the replays the kernel: the
    same set, but ties and unsorted order may differ between them), else torch.
    ``sorted=True``: descending score order (with "triton": equal scores by ascending index), so masked
    (-inf) keys come after all visible ones. Unsorted: with "triton", keys above the k-th score in index
    order, then the threshold ties; with "torch", torch's order. Ties at the k-th score: "triton" takes
    the lowest indices; "torch" is unspecified. ``invalid_index`` (e.g. -1), when given, replaces the index of every selected key whose
    logit is -inf.
    """
    from . import topk as _tk

    T = logits.shape[-1]
    kk = min(int(topk), T)
    if method not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown top-k method {method!r}")
    rows = logits.numel() // max(1, T)
    algorithm = None  # which of our kernels "auto" would run, where one applies
    if method == "auto" and _tk.supported(logits, kk):
        algorithm = _tk.default_algorithm(logits.reshape(-1, T), kk, sorted)
    use_triton = method == "triton" or (
        algorithm is not None
        and _tk.faster_than_torch(rows, T, kk, sorted, in_cuda_graph=torch.cuda.is_current_stream_capturing(),
                                  algorithm=algorithm))
    if use_triton:
        idx = _tk.row_topk(logits, kk, sorted=sorted, algorithm=algorithm or "auto")
        if invalid_index is not None:
            vals = torch.gather(logits, -1, idx.long())
            idx = idx.masked_fill_(torch.isneginf(vals), int(invalid_index))
        return idx
    vals, idx = torch.topk(logits, kk, dim=-1, largest=True, sorted=sorted)
    idx = idx.to(torch.int32)
    if invalid_index is not None:
        idx = idx.masked_fill_(torch.isneginf(vals), int(invalid_index))
    return idx


def lightning_indexer(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    *,
    causal: bool = True,
    scale: float = 1.0,
    kv_lens: Optional[torch.Tensor] = None,
    sorted: bool = True,
    invalid_index: Optional[int] = None,
    return_logits: bool = False,
    config: Optional[LogitsConfig] = None,
    topk_method: str = "auto",
):
    """Indexer top-k indices (int32 ``[B, S, min(topk, T)]``) through the fused logits kernel.

    With ``return_logits=True`` returns ``(indices, logits)``. See ``indexer_topk`` for order and ties.
    """
    logits = indexer_logits(q, k, weights, causal=causal, scale=scale, kv_lens=kv_lens, config=config)
    idx = indexer_topk(logits, topk, sorted=sorted, invalid_index=invalid_index, method=topk_method)
    return (idx, logits) if return_logits else idx


def lightning_indexer_reference(
    q, k, weights, topk, *, causal=True, scale=1.0, kv_lens=None, sorted=True, invalid_index=None,
    dtype=torch.float32,
):
    """Reference indices: torch.topk over ``indexer_logits_reference`` (same -inf rule as the kernel path)."""
    logits = indexer_logits_reference(q, k, weights, causal=causal, scale=scale, kv_lens=kv_lens, dtype=dtype)
    return indexer_topk(logits, topk, sorted=sorted, invalid_index=invalid_index, method="torch")


# ----------------------------------------------------------------------------------------------
# Custom ops, for graph passes: the kernel on supported CUDA inputs, the reference elsewhere
# ----------------------------------------------------------------------------------------------


def _logits_any(q, k, weights, causal, scale, kv_lens):
    why = unsupported_reason(q, k, weights, kv_lens, scale=scale)
    if why is None:
        return indexer_logits(q, k, weights, causal=causal, scale=scale, kv_lens=kv_lens)
    if q.is_cuda:  # the compile-time check let the site through, so this fallback is a surprise: say so
        _warn_fallback(why, f"q {q.dtype} {tuple(q.shape)}, k {k.dtype} {tuple(k.shape)}, weights {weights.dtype}")
    return indexer_logits_reference(q, k, weights, causal=causal, scale=scale, kv_lens=kv_lens)


@functools.lru_cache(maxsize=64)
def _warn_fallback(why: str, inputs: str) -> None:
    """Once per reason and input shape: a fused site that runs the (exact, slow) reference on CUDA at run time."""
    from torch._dynamo.utils import counters

    counters["fx_indexcache"]["fused_op_reference_fallbacks"] += 1
    logging.getLogger(__name__).warning(
        "fx_indexcache::indexer_logits runs its reference (fp32 einsum, slow) on CUDA inputs: %s (%s)", why, inputs)


def indexer_logits_rounded(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    dtype: torch.dtype,
    *,
    causal: bool = True,
    scale: float = 1.0,
    kv_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``indexer_logits`` computed in fp32 and rounded once, at the store, to ``dtype`` (bf16 or fp16).

    For graphs whose score is bf16/fp16: the value of ``indexer_logits(...).to(dtype)`` (bit for bit: the
    store rounds to nearest even, as ``Tensor.to`` does) with half the bytes written and no second pass.
    Off CUDA or where the kernel cannot run, the fp32 reference rounded the same way.
    """
    if dtype not in _KERNEL_DTYPES:
        raise ValueError(f"indexer_logits_rounded: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    why = unsupported_reason(q, k, weights, kv_lens, scale=scale)
    if why is not None:
        if q.is_cuda:  # the compile-time check let the site through, so this fallback is a surprise: say so
            _warn_fallback(why, f"q {q.dtype} {tuple(q.shape)}, k {k.dtype} {tuple(k.shape)}, weights {weights.dtype}")
        return indexer_logits_reference(q, k, weights, causal=causal, scale=scale, kv_lens=kv_lens).to(dtype)
    if kv_lens is not None and kv_lens.shape[0] != q.shape[0]:
        raise ValueError("kv_lens must have one entry per batch row")
    out = torch.empty((q.shape[0], q.shape[1], k.shape[1]), dtype=dtype, device=q.device)
    return launch_into(q, k, weights, out, causal, scale, kv_lens, None)


def _define_rounded_logits_op() -> None:
    """Define ``torch.ops.fx_indexcache.indexer_logits_rounded(q, k, weights, causal, scale, kv_lens, dtype)``
    -> ``[B, S, T]`` in ``dtype`` (idempotent): the op the substitution inserts where the graph's score is
    bf16/fp16 (``fuse/substitute.py``: the kernel keeps fp32 inside and rounds where the graph stores the score)."""
    if _registered("indexer_logits_rounded"):
        return
    from torch.library import custom_op

    @custom_op("fx_indexcache::indexer_logits_rounded", mutates_args=())
    def _op(
        q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, causal: bool, scale: float,
        kv_lens: Optional[torch.Tensor], dtype: torch.dtype,
    ) -> torch.Tensor:
        return indexer_logits_rounded(q, k, weights, dtype, causal=causal, scale=scale, kv_lens=kv_lens)

    @_op.register_fake
    def _(q, k, weights, causal, scale, kv_lens, dtype):
        if dtype not in _KERNEL_DTYPES:
            raise ValueError(f"indexer_logits_rounded: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        return q.new_empty((q.shape[0], q.shape[1], k.shape[1]), dtype=dtype)


def _registered(name: str) -> bool:
    try:
        return hasattr(torch.ops.fx_indexcache, name)
    except Exception:
        return False


def define_logits_op(name: str, impl) -> None:
    """Define ``torch.ops.fx_indexcache.<name>(q, k, weights, causal, scale, kv_lens)`` -> fp32 ``[B, S, T]``,
    running ``impl`` with those arguments (idempotent): the form every logits op the substitution inserts takes."""
    if _registered(name):
        return
    from torch.library import custom_op

    @custom_op(f"fx_indexcache::{name}", mutates_args=())
    def _op(
        q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, causal: bool, scale: float,
        kv_lens: Optional[torch.Tensor],
    ) -> torch.Tensor:
        return impl(q, k, weights, causal, scale, kv_lens)

    @_op.register_fake
    def _(q, k, weights, causal, scale, kv_lens):
        return q.new_empty((q.shape[0], q.shape[1], k.shape[1]), dtype=torch.float32)


def _define_topk_op() -> None:
    """Define ``torch.ops.fx_indexcache.topk_indices`` (idempotent), the top-k op the substitution inserts."""
    if _registered("topk_indices"):
        return
    from torch.library import custom_op

    @custom_op("fx_indexcache::topk_indices", mutates_args=())
    def _op_topk(x: torch.Tensor, k: int, sorted: bool) -> torch.Tensor:
        """int32 indices of the k largest along the last dim: the Triton top-k where it applies, else torch."""
        return indexer_topk(x, k, sorted=sorted)

    @_op_topk.register_fake
    def _(x, k, sorted):
        return x.new_empty((*x.shape[:-1], torch.sym_min(k, x.shape[-1])), dtype=torch.int32)


define_logits_op("indexer_logits", _logits_any)
_define_rounded_logits_op()
_define_topk_op()
