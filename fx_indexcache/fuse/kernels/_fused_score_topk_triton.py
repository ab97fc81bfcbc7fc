"""Triton code of ``indexer_topk_fused`` (score + top-k without the ``[S, T]`` logits; see that module for the plan).

Module level so that the jit functions can call each other and the top-k helpers of ``_topk_triton`` (also under
``TRITON_INTERPRET=1``); imported only when a kernel is launched.

Rows are ``(b, s)`` pairs, ``row = b * S + s``. Every launch scores keys the way the logits kernels of
``lightning_indexer`` do (one tensor-core product per head, fp32 accumulation, ReLU, head weight, head sum),
in one of two layouts: ``prefill`` (a program owns ``BLOCK_S`` queries x ``BLOCK_T`` keys and loops over the
heads) or ``decode`` (a program owns ``SQ`` queries, looped, x ``BLOCK_T`` keys, all heads on the M side).

Per-row counters are int64 ``n_gt + (n_eq << 32)``: one atomic a (row, tile) reserves places in both buffers.
"""

import triton
import triton.language as tl

from ._topk_split_triton import _release_writes
from ._topk_triton import _exact_from_memory, _key, _kth_key_any, _sort_selected

#: The lowest int32 key: the threshold of a row taken whole, and the candidates' padding.
INT_MIN = tl.constexpr(-2147483648)


# ----------------------------------------------------------------------------------------------
# Scoring (the logits kernels' arithmetic, plus the optional bias and drop masks)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _visible_len(kvlen_ptr, b, T, HAS_KVLEN: tl.constexpr):
    if HAS_KVLEN:
        return tl.minimum(tl.maximum(tl.load(kvlen_ptr + b).to(tl.int32), 0), T)
    else:
        return T + 0 * b.to(tl.int32)


@triton.jit
def _apply_masks(acc, rs, rt, s_ok, t_ok, b, kv_len, off, bias_ptr, drop_ptr, sbb, sbs, sbt, sdb, sds, sdt,
                 CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROP: tl.constexpr):
    """``acc [BS, BT]`` (rows ``rs``, keys ``rt``) masked as the module doc of ``indexer_topk_fused`` says:
    invisible keys -inf, ``+ bias`` on visible keys, then ``drop`` -> -inf."""
    valid = (rt[None, :] < kv_len) & t_ok[None, :]
    if CAUSAL:
        valid = valid & (rt[None, :] <= rs[:, None] + off)
    ok2 = s_ok[:, None] & t_ok[None, :]
    rs64 = rs.to(tl.int64)[:, None]
    rt64 = rt.to(tl.int64)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + b * sbb + rs64 * sbs + rt64 * sbt, mask=ok2, other=0.0).to(tl.float32)
    score = tl.where(valid, acc, float("-inf"))
    if HAS_DROP:
        dropped = tl.load(drop_ptr + b * sdb + rs64 * sds + rt64 * sdt, mask=ok2, other=0) != 0
        score = tl.where(dropped, float("-inf"), score)
    return score


@triton.jit
def _score_tile(q_ptr, k_ptr, w_ptr, b, rs, rt, s_ok, t_ok, H, scale,
                sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, D: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """Prefill layout: ``sum_h w[s, h] * scale * relu(q[s, h] . k[t])`` for rows ``rs`` x keys ``rt`` (fp32)."""
    rd = tl.arange(0, D)
    kt = tl.load(k_ptr + b * skb + rt.to(tl.int64)[:, None] * skt + rd[None, :] * skd, mask=t_ok[:, None], other=0.0)
    kt_t = tl.trans(kt)
    rs64 = rs.to(tl.int64)
    q_ptrs = q_ptr + b * sqb + rs64[:, None] * sqs + rd[None, :] * sqd
    w_ptrs = w_ptr + b * swb + rs64 * sws
    acc = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
    for h in range(0, H):
        qh = tl.load(q_ptrs + h * sqh, mask=s_ok[:, None], other=0.0)
        wh = tl.load(w_ptrs + h * swh, mask=s_ok, other=0.0).to(tl.float32) * scale
        acc += tl.maximum(tl.dot(qh, kt_t), 0.0) * wh[:, None]
    return acc


@triton.jit
def _score_query(q_ptr, w_ptr, kt_t, b, s, H, scale, sqb, sqs, sqh, sqd, swb, sws, swh,
                 D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Decode layout: one query ``s`` against the keys of ``kt_t [D, BT]``, all heads on the M side (fp32 [BT])."""
    rd = tl.arange(0, D)
    rh = tl.arange(0, BLOCK_H)
    h_ok = rh < H
    s64 = s.to(tl.int64)
    qs = tl.load(q_ptr + b * sqb + s64 * sqs + rh[:, None] * sqh + rd[None, :] * sqd, mask=h_ok[:, None], other=0.0)
    ws = tl.load(w_ptr + b * swb + s64 * sws + rh * swh, mask=h_ok, other=0.0).to(tl.float32) * scale
    return tl.sum(tl.maximum(tl.dot(qs, kt_t), 0.0) * ws[:, None], axis=0)


@triton.jit
def _load_keys_t(k_ptr, b, rt, t_ok, skb, skt, skd, D: tl.constexpr):
    rd = tl.arange(0, D)
    kt = tl.load(k_ptr + b * skb + rt.to(tl.int64)[:, None] * skt + rd[None, :] * skd, mask=t_ok[:, None], other=0.0)
    return tl.trans(kt)


@triton.jit
def _sample_pos(n, T, NB: tl.constexpr, SB: tl.constexpr):
    """Key position of sample slot ``n``: ``NB`` blocks of ``SB`` contiguous keys spread evenly over the row
    (the sample ``topk._sampled_threshold`` reads from materialised logits)."""
    return (((n // SB).to(tl.int64) * T) // NB + n % SB).to(tl.int32)


# ----------------------------------------------------------------------------------------------
# Filtering a scored tile into the per-row buffers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _flags(keys, ok, thr):
    """Which keys lie above / at the threshold, and both packed in one int32 (above in the low 16 bits, at in the
    high 16: one sum and one scan count both; a tile has < 2^16 keys)."""
    gt = ok & (keys > thr)
    eq = ok & (keys == thr)
    return gt, eq, gt.to(tl.int32) + (eq.to(tl.int32) << 16)


@triton.jit
def _packed_count(tot):
    """A row's packed int32 counts as the int64 its counter holds (above in the low 32 bits, at in the high 32)."""
    return (tot & 0xFFFF).to(tl.int64) + ((tot >> 16).to(tl.int64) << 32)


@triton.jit
def _append(keys, idx, gt, eq, old, run, row64, cand_key_ptr, cand_idx_ptr, tie_idx_ptr,
            CAP: tl.constexpr, TCAP: tl.constexpr):
    """Store each flagged key at its place: the row's counter before this tile (``old``) plus its rank in the
    tile (the packed inclusive scan ``run``); places past a buffer's capacity are dropped (the select sees the
    counter and falls back)."""
    p_gt = (old & 0xFFFFFFFF).to(tl.int32) + (run & 0xFFFF) - 1
    p_eq = (old >> 32).to(tl.int32) + (run >> 16) - 1
    keep_gt = gt & (p_gt < CAP)
    tl.store(cand_key_ptr + row64 * CAP + p_gt, keys, mask=keep_gt)
    tl.store(cand_idx_ptr + row64 * CAP + p_gt, idx + 0 * p_gt, mask=keep_gt)
    tl.store(tie_idx_ptr + row64 * TCAP + p_eq, idx + 0 * p_eq, mask=eq & (p_eq < TCAP))


@triton.jit
def _filter_tile(score, rows, rt, s_ok, t_ok, thr, cnt_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr,
                 CAP: tl.constexpr, TCAP: tl.constexpr):
    """Append the keys of ``score [BS, BT]`` above their row's threshold ``thr [BS]`` to the candidate buffers
    and those equal to it to the tie buffer (one atomic a row reserves the places; order across tiles is
    whatever the atomics give: the select does not depend on it)."""
    keys = _key(score)
    gt, eq, both = _flags(keys, s_ok[:, None] & t_ok[None, :], thr[:, None])
    tot = tl.sum(both, axis=1)
    old = tl.atomic_add(cnt_ptr + rows, _packed_count(tot), mask=s_ok & (tot != 0), sem="relaxed")
    _append(keys, rt[None, :], gt, eq, old[:, None], tl.cumsum(both, axis=1), rows.to(tl.int64)[:, None],
            cand_key_ptr, cand_idx_ptr, tie_idx_ptr, CAP, TCAP)


@triton.jit
def _filter_row(score, row, rt, t_ok, thr, cnt_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr,
                CAP: tl.constexpr, TCAP: tl.constexpr):
    """``_filter_tile`` for one query row, ``score [BT]`` and a scalar threshold (decode). One-dimensional on
    purpose: a [1, BT] tile of the decode layout reaches the prefix sum in a layout whose rows repeat across
    warps, and Triton 3.6 fails to lower a scan over it (an assertion in ``ScanOpToLLVM`` on an H100)."""
    keys = _key(score)
    gt, eq, both = _flags(keys, t_ok, thr)
    tot = tl.sum(both, axis=0)
    old = tl.atomic_add(cnt_ptr + row, _packed_count(tot), mask=tot != 0, sem="relaxed")
    _append(keys, rt, gt, eq, old, tl.cumsum(both, axis=0), row.to(tl.int64), cand_key_ptr, cand_idx_ptr,
            tie_idx_ptr, CAP, TCAP)


@triton.jit
def _filter_tile_atomic(score, rows, rt, s_ok, t_ok, thr, cnt_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr,
                        CAP: tl.constexpr, TCAP: tl.constexpr):
    """``_filter_tile`` with no prefix sum: each flagged key takes its place from an atomic of its own on its row's
    counter, the candidates' half (low 32 bits) or the ties' half (high 32 bits). Past its flags a tile holds
    only its keys and their places, where the scan's packed flags, running sums and places hold three more
    values a key: the registers that cap the scan filter's prefill tiles at 64 keys, where this one's take 256. The
    places are in atomic order, as the scan filter's are across tiles: the select does not depend on it.
    ``score [BS, BT]``, ``rows [BS]`` (int64), ``thr [BS]``."""
    keys = _key(score)
    ok = s_ok[:, None] & t_ok[None, :]
    gt = ok & (keys > thr[:, None])
    eq = ok & (keys == thr[:, None])
    halves = cnt_ptr.to(tl.pointer_type(tl.int32))  # (little-endian: a row's candidates at 2 row, its ties at 2 row + 1)
    row64 = rows.to(tl.int64)[:, None]
    place = tl.atomic_add(halves + 2 * row64 + eq.to(tl.int64), 1, mask=gt | eq, sem="relaxed")
    idx = rt[None, :] + 0 * place
    tl.store(cand_key_ptr + row64 * CAP + place, keys, mask=gt & (place < CAP))
    tl.store(cand_idx_ptr + row64 * CAP + place, idx, mask=gt & (place < CAP))
    tl.store(tie_idx_ptr + row64 * TCAP + place, idx, mask=eq & (place < TCAP))


# ----------------------------------------------------------------------------------------------
# Select (one row, from its buffers)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _nth_smallest(vals, mask, n):
    """The ``n``-th smallest (1-based) of the distinct non-negative int32 ``vals`` where ``mask`` (n <= count):
    a bitwise search, one bit a step, for the largest ``v`` with fewer than ``n`` values below it."""
    v = n * 0
    for i in range(23):  # indices < 2^22 (topk.MAX_ROW)
        c = v + (1 << (22 - i))
        below = tl.sum((mask & (vals < c)).to(tl.int32), axis=0)
        v = tl.where(below < n, c, v)
    return v


@triton.jit
def _emit(o_row, sok, sel_row, pos, keys, idxs, take, SORTED: tl.constexpr):
    """Place selected entries at output positions ``pos``: their indices, or (sorted) packed (key, ~index)
    pairs into the row's scratch for the sort that follows."""
    if SORTED:
        low = tl.full(pos.shape, 0xFFFFFFFF, tl.int64)
        packed = (keys.to(tl.int64) << 32) | (low - idxs.to(tl.int64))
        tl.store(sel_row + pos, packed, mask=take)
    else:
        tl.store(o_row + pos.to(tl.int64) * sok, idxs, mask=take)


@triton.jit
def _sort_emitted(o_row, sok, sel_row, K, KP: tl.constexpr):
    """Descending key, equal keys by ascending index: one packed int64 sort of the K emitted pairs."""
    kk = tl.arange(0, KP)
    okk = kk < K
    packed = tl.load(sel_row + kk, mask=okk, other=-9223372036854775807 - 1)
    srt = tl.sort(packed, descending=True)
    low = tl.full([KP], 0xFFFFFFFF, tl.int64)
    tl.store(o_row + kk.to(tl.int64) * sok, (low - (srt & low)).to(tl.int32), mask=okk)


@triton.jit
def _select_buffers(o_row, sok, ck, ci, ti, sel_row, L, n_gt, n_eq, T, K,
                    CAP: tl.constexpr, TCAP: tl.constexpr, KP: tl.constexpr, SORTED: tl.constexpr):
    """The row's K indices from its buffers, or -1 when they cannot give them (the caller falls back).

    1: at least K keys above ``L`` and all of them buffered: the exact K-th key among them, every key above
    it, then the lowest-indexed keys equal to it. 2: fewer than K above ``L`` but every tie at ``L``
    buffered: all candidates, then the lowest-indexed ties. 4: fewer than K above ``L`` and every other key
    of the row ties at ``L`` (a masked tail: -inf, or a large negative additive mask) but too many to
    buffer: the lowest indices outside the candidates (all below K)."""
    offs = tl.arange(0, CAP)
    okc = offs < n_gt
    path = n_gt * 0 - 1
    if (n_gt <= CAP) & (n_gt >= K):
        keys = tl.load(ck + offs, mask=okc, other=INT_MIN)
        kth = _kth_key_any(keys, K)
        idxs = tl.load(ci + offs, mask=okc, other=0)
        gt = okc & (keys > kth)
        eq = okc & (keys == kth)
        need = K - tl.sum(gt.to(tl.int32), axis=0)
        if tl.sum(eq.to(tl.int32), axis=0) > need:  # ties at the K-th key: the lowest indices win
            eq = eq & (idxs <= _nth_smallest(idxs, eq, need))
        take = gt | eq
        _emit(o_row, sok, sel_row, tl.cumsum(take.to(tl.int32), axis=0) - 1, keys, idxs, take, SORTED)
        path = n_gt * 0 + 1
    elif (n_gt <= CAP) & (n_gt + n_eq >= K):
        keys = tl.load(ck + offs, mask=okc, other=INT_MIN)
        _emit(o_row, sok, sel_row, offs, keys, tl.load(ci + offs, mask=okc, other=0), okc, SORTED)
        need = K - n_gt
        if n_eq <= TCAP:
            tt = tl.arange(0, TCAP)
            okt = tt < n_eq
            tie = tl.load(ti + tt, mask=okt, other=0)
            if n_eq > need:
                okt = okt & (tie <= _nth_smallest(tie, okt, need))
            pos = n_gt + tl.cumsum(okt.to(tl.int32), axis=0) - 1
            _emit(o_row, sok, sel_row, pos, L + 0 * tie, tie, okt, SORTED)
            path = n_gt * 0 + 2
        elif n_gt + n_eq == T:  # every key not above L ties at L: the lowest indices outside the candidates
            kk = tl.arange(0, KP)
            flag_row = sel_row + KP  # the scratch's second half: one flag per index below K
            tl.store(flag_row + kk, tl.zeros([KP], tl.int64))
            tl.debug_barrier()
            idxs = tl.load(ci + offs, mask=okc, other=0)
            tl.store(flag_row + idxs, tl.full([CAP], 1, tl.int64), mask=okc & (idxs < K))
            tl.debug_barrier()
            free = (kk < K) & (tl.load(flag_row + kk) == 0)
            pos = n_gt + tl.cumsum(free.to(tl.int32), axis=0) - 1
            _emit(o_row, sok, sel_row, pos, L + 0 * kk, kk, free & (pos < K), SORTED)
            path = n_gt * 0 + 4
    return path


@triton.jit
def _fallback_row(q_ptr, k_ptr, w_ptr, kvlen_ptr, bias_ptr, drop_ptr, o_row, sok, x_row, b, s, S, T, H, K, scale,
                  sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sbb, sbs, sbt, sdb, sds, sdt,
                  CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROP: tl.constexpr,
                  D: tl.constexpr, BLOCK_H: tl.constexpr, FB_BLOCK_T: tl.constexpr, CHUNK: tl.constexpr,
                  KP: tl.constexpr, SORTED: tl.constexpr):
    """Where the sample misled: score the whole row into ``x_row`` (this row's scratch), then the exact search
    over it from memory (``_exact_from_memory``: the project's tie rule), then the sort. Slow, never wrong."""
    kv_len = _visible_len(kvlen_ptr, b, T, HAS_KVLEN)
    off = kv_len - S
    one = tl.full([1], 1, tl.int1)
    for t0 in range(0, T, FB_BLOCK_T):
        rt = t0 + tl.arange(0, FB_BLOCK_T)
        t_ok = rt < T
        kt_t = _load_keys_t(k_ptr, b, rt, t_ok, skb, skt, skd, D)
        acc = _score_query(q_ptr, w_ptr, kt_t, b, s, H, scale, sqb, sqs, sqh, sqd, swb, sws, swh, D, BLOCK_H)
        score = _apply_masks(acc[None, :], s + tl.zeros([1], tl.int32), rt, one, t_ok, b, kv_len, off,
                             bias_ptr, drop_ptr, sbb, sbs, sbt, sdb, sds, sdt, CAUSAL, HAS_BIAS, HAS_DROP)
        tl.store(x_row + rt[None, :], score, mask=t_ok[None, :])
    tl.debug_barrier()  # the row just written is read back by every thread
    _exact_from_memory(x_row, 1, o_row, sok, T, K, CHUNK)
    if SORTED:
        tl.debug_barrier()
        _sort_selected(x_row, 1, o_row, sok, K, KP)


@triton.jit
def _select_row(q_ptr, k_ptr, w_ptr, kvlen_ptr, bias_ptr, drop_ptr, out_ptr, cnt_ptr, thr_ptr,
                cand_key_ptr, cand_idx_ptr, tie_idx_ptr, sel_ptr, fb_ptr, fb_cnt_ptr, path_ptr, row,
                S, T, H, K, scale,
                sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sbb, sbs, sbt, sdb, sds, sdt, sor, sok,
                CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROP: tl.constexpr,
                D: tl.constexpr, BLOCK_H: tl.constexpr, FB_BLOCK_T: tl.constexpr, CHUNK: tl.constexpr,
                DIRECT: tl.constexpr, CAP: tl.constexpr, TCAP: tl.constexpr, KP: tl.constexpr,
                SORTED: tl.constexpr, FALLBACK_INLINE: tl.constexpr, RECORD_PATH: tl.constexpr):
    """One row's select; where the buffers cannot give it, the fallback: here (``FALLBACK_INLINE``: the row's
    own scratch, ``fb_ptr [R, T]``) or listed for ``_fallback_kernel``."""
    row64 = row.to(tl.int64)
    cnt = tl.load(cnt_ptr + row64)
    n_gt = (cnt & 0xFFFFFFFF).to(tl.int32)
    n_eq = (cnt >> 32).to(tl.int32)
    if DIRECT:
        L = tl.full([], INT_MIN, tl.int32)
    else:
        L = tl.load(thr_ptr + row64)
    o_row = out_ptr + row64 * sor
    sel_row = sel_ptr + row64 * (2 * KP)
    path = _select_buffers(o_row, sok, cand_key_ptr + row64 * CAP, cand_idx_ptr + row64 * CAP,
                           tie_idx_ptr + row64 * TCAP, sel_row, L, n_gt, n_eq, T, K, CAP, TCAP, KP, SORTED)
    if path < 0:
        if FALLBACK_INLINE:
            _fallback_row(q_ptr, k_ptr, w_ptr, kvlen_ptr, bias_ptr, drop_ptr, o_row, sok, fb_ptr + row64 * T,
                          row64 // S, (row % S), S, T, H, K, scale,
                          sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sbb, sbs, sbt, sdb, sds, sdt,
                          CAUSAL, HAS_KVLEN, HAS_BIAS, HAS_DROP, D, BLOCK_H, FB_BLOCK_T, CHUNK, KP, SORTED)
        else:
            slot = tl.atomic_add(fb_cnt_ptr, 1, sem="relaxed")
            tl.store(fb_ptr + slot, row.to(tl.int32))
        path = path * 0 + 3
    else:
        if SORTED:
            tl.debug_barrier()  # the packed pairs just stored are read back by every thread
            _sort_emitted(o_row, sok, sel_row, K, KP)
        if DIRECT:
            path = path * 0
    if RECORD_PATH:  # 0 direct, 1 candidates, 2 ties at the threshold, 3 fallback, 4 masked tail
        tl.store(path_ptr + row64, path)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _threshold_row(samp_ptr, thr_ptr, row, R_SAMPLE, NS: tl.constexpr):
    """The ``R_SAMPLE``-th largest key of the row's sampled scores (``samp [R, NS]``)."""
    row64 = row.to(tl.int64)
    keys = _key(tl.load(samp_ptr + row64 * NS + tl.arange(0, NS)))
    tl.store(thr_ptr + row64, _kth_key_any(keys, R_SAMPLE))


@triton.jit
def _sample_kernel(
    q_ptr, k_ptr, w_ptr, kvlen_ptr, bias_ptr, drop_ptr, samp_ptr, thr_ptr, done_ptr,
    S, T, H, scale, R_SAMPLE,
    sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sbb, sbs, sbt, sdb, sds, sdt,
    CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROP: tl.constexpr,
    D: tl.constexpr, DECODE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    NB: tl.constexpr, SB: tl.constexpr, THRESHOLD_LAST: tl.constexpr, FENCE: tl.constexpr,
):
    """Score the sampled keys of ``BLOCK_S`` rows (decode: ``BLOCK_S`` queries looped) into ``samp [R, NS]``;
    with ``THRESHOLD_LAST`` the group's last program to finish then computes those rows' thresholds."""
    NS: tl.constexpr = NB * SB
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n = pid_n * BLOCK_T + tl.arange(0, BLOCK_T)
    rt = _sample_pos(n, T, NB, SB)
    t_ok = n < NS
    kv_len = _visible_len(kvlen_ptr, b, T, HAS_KVLEN)
    off = kv_len - S
    s0 = pid_s * BLOCK_S
    if DECODE:
        kt_t = _load_keys_t(k_ptr, b, rt, t_ok, skb, skt, skd, D)
        one = tl.full([1], 1, tl.int1)
        for i in range(BLOCK_S):
            s = tl.minimum(s0 + i, S - 1)  # rows past S redo the last row (same values, same places)
            acc = _score_query(q_ptr, w_ptr, kt_t, b, s, H, scale, sqb, sqs, sqh, sqd, swb, sws, swh, D, BLOCK_H)
            score = _apply_masks(acc[None, :], s + tl.zeros([1], tl.int32), rt, one, t_ok, b, kv_len, off,
                                 bias_ptr, drop_ptr, sbb, sbs, sbt, sdb, sds, sdt, CAUSAL, HAS_BIAS, HAS_DROP)
            tl.store(samp_ptr + (b * S + s) * NS + n[None, :], score, mask=t_ok[None, :])
    else:
        rs = s0 + tl.arange(0, BLOCK_S)
        s_ok = rs < S
        acc = _score_tile(q_ptr, k_ptr, w_ptr, b, rs, rt, s_ok, t_ok, H, scale,
                          sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, D, BLOCK_S, BLOCK_T)
        score = _apply_masks(acc, rs, rt, s_ok, t_ok, b, kv_len, off, bias_ptr, drop_ptr,
                             sbb, sbs, sbt, sdb, sds, sdt, CAUSAL, HAS_BIAS, HAS_DROP)
        tl.store(samp_ptr + (b * S + rs.to(tl.int64))[:, None] * NS + n[None, :], score,
                 mask=s_ok[:, None] & t_ok[None, :])
    if THRESHOLD_LAST:
        if FENCE:
            _release_writes(pid_n)
        tl.debug_barrier()
        group = b * tl.num_programs(1) + pid_s
        finished = tl.atomic_add(done_ptr + group, 1, sem="acq_rel", scope="gpu")
        if finished == tl.num_programs(0) - 1:
            for i in range(BLOCK_S):
                if s0 + i < S:
                    _threshold_row(samp_ptr, thr_ptr, b * S + s0 + i, R_SAMPLE, NS)


@triton.jit
def _threshold_kernel(samp_ptr, thr_ptr, R_SAMPLE, NS: tl.constexpr):
    _threshold_row(samp_ptr, thr_ptr, tl.program_id(0), R_SAMPLE, NS)


@triton.jit
def _score_filter_kernel(
    q_ptr, k_ptr, w_ptr, kvlen_ptr, bias_ptr, drop_ptr, out_ptr, cnt_ptr, thr_ptr,
    cand_key_ptr, cand_idx_ptr, tie_idx_ptr, sel_ptr, fb_ptr, fb_cnt_ptr, path_ptr, done_ptr,
    S, T, H, K, scale,
    sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sbb, sbs, sbt, sdb, sds, sdt, sor, sok,
    CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROP: tl.constexpr,
    D: tl.constexpr, DECODE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    DIRECT: tl.constexpr, CAP: tl.constexpr, TCAP: tl.constexpr, KP: tl.constexpr, CHUNK: tl.constexpr,
    FB_BLOCK_T: tl.constexpr, SORTED: tl.constexpr, RECORD_PATH: tl.constexpr,
    SELECT_LAST: tl.constexpr, FENCE: tl.constexpr, ATOMIC_FILTER: tl.constexpr,
):
    """Score a (key block, query block) tile and keep, of each row, only the keys at or above its threshold
    (no logits written); with ``SELECT_LAST`` (one query row) the last program to finish selects. ``ATOMIC_FILTER``:
    places from an atomic a kept key (``_filter_tile_atomic``), not from the tile's prefix sum."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t0 = pid_t * BLOCK_T
    rt = t0 + tl.arange(0, BLOCK_T)
    t_ok = rt < T
    kv_len = _visible_len(kvlen_ptr, b, T, HAS_KVLEN)
    off = kv_len - S
    s0 = pid_s * BLOCK_S
    t_hi = kv_len  # exclusive upper bound of the keys any row of this tile sees
    if CAUSAL:
        t_hi = tl.minimum(t_hi, tl.minimum(s0 + BLOCK_S, S) + off)
    if DECODE:
        one = tl.full([1], 1, tl.int1)
        kt_t = _load_keys_t(k_ptr, b, rt, t_ok, skb, skt, skd, D)
        for i in range(BLOCK_S):
            s = s0 + i
            if s < S:
                if t0 < t_hi:
                    acc = _score_query(q_ptr, w_ptr, kt_t, b, s, H, scale, sqb, sqs, sqh, sqd, swb, sws, swh,
                                       D, BLOCK_H)
                else:  # every key of the tile is hidden from this query block: no arithmetic
                    acc = tl.zeros([BLOCK_T], tl.float32)
                row = b * S + s
                score = _apply_masks(acc[None, :], s + tl.zeros([1], tl.int32), rt, one, t_ok, b, kv_len, off,
                                     bias_ptr, drop_ptr, sbb, sbs, sbt, sdb, sds, sdt, CAUSAL, HAS_BIAS, HAS_DROP)
                if DIRECT:
                    thr = INT_MIN
                else:
                    thr = tl.load(thr_ptr + row)
                if ATOMIC_FILTER:
                    _filter_tile_atomic(score, row + tl.zeros([1], tl.int64), rt, one, t_ok,
                                        thr + tl.zeros([1], tl.int32), cnt_ptr, cand_key_ptr, cand_idx_ptr,
                                        tie_idx_ptr, CAP, TCAP)
                else:
                    _filter_row(tl.max(score, axis=0), row, rt, t_ok, thr, cnt_ptr, cand_key_ptr, cand_idx_ptr,
                                tie_idx_ptr, CAP, TCAP)
    else:
        rs = s0 + tl.arange(0, BLOCK_S)
        s_ok = rs < S
        if t0 < t_hi:
            acc = _score_tile(q_ptr, k_ptr, w_ptr, b, rs, rt, s_ok, t_ok, H, scale,
                              sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, D, BLOCK_S, BLOCK_T)
        else:
            acc = tl.zeros([BLOCK_S, BLOCK_T], tl.float32)
        score = _apply_masks(acc, rs, rt, s_ok, t_ok, b, kv_len, off, bias_ptr, drop_ptr,
                             sbb, sbs, sbt, sdb, sds, sdt, CAUSAL, HAS_BIAS, HAS_DROP)
        rows = b * S + rs.to(tl.int64)
        if DIRECT:
            thr = tl.full([BLOCK_S], INT_MIN, tl.int32)
        else:
            thr = tl.load(thr_ptr + rows, mask=s_ok, other=0)
        if ATOMIC_FILTER:
            _filter_tile_atomic(score, rows, rt, s_ok, t_ok, thr, cnt_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr,
                                CAP, TCAP)
        else:
            _filter_tile(score, rows, rt, s_ok, t_ok, thr, cnt_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr, CAP,
                         TCAP)
    if SELECT_LAST:
        if FENCE:
            _release_writes(pid_t)
        tl.debug_barrier()  # every thread's stores are fenced before one thread counts this program done
        finished = tl.atomic_add(done_ptr + b * tl.num_programs(1) + pid_s, 1, sem="acq_rel", scope="gpu")
        if finished == tl.num_programs(0) - 1:
            for i in range(BLOCK_S):
                if s0 + i < S:
                    _select_row(q_ptr, k_ptr, w_ptr, kvlen_ptr, bias_ptr, drop_ptr, out_ptr, cnt_ptr, thr_ptr,
                                cand_key_ptr, cand_idx_ptr, tie_idx_ptr, sel_ptr, fb_ptr, fb_cnt_ptr, path_ptr,
                                (b * S + s0 + i), S, T, H, K, scale,
                                sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sbb, sbs, sbt, sdb, sds, sdt,
                                sor, sok, CAUSAL, HAS_KVLEN, HAS_BIAS, HAS_DROP, D, BLOCK_H, FB_BLOCK_T, CHUNK,
                                DIRECT, CAP, TCAP, KP, SORTED, True, RECORD_PATH)


@triton.jit
def _select_kernel(
    q_ptr, k_ptr, w_ptr, kvlen_ptr, bias_ptr, drop_ptr, out_ptr, cnt_ptr, thr_ptr,
    cand_key_ptr, cand_idx_ptr, tie_idx_ptr, sel_ptr, fb_ptr, fb_cnt_ptr, path_ptr,
    S, T, H, K, scale,
    sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sbb, sbs, sbt, sdb, sds, sdt, sor, sok,
    CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROP: tl.constexpr,
    D: tl.constexpr, BLOCK_H: tl.constexpr, FB_BLOCK_T: tl.constexpr, CHUNK: tl.constexpr,
    DIRECT: tl.constexpr, CAP: tl.constexpr, TCAP: tl.constexpr, KP: tl.constexpr,
    SORTED: tl.constexpr, FALLBACK_INLINE: tl.constexpr, RECORD_PATH: tl.constexpr,
):
    _select_row(q_ptr, k_ptr, w_ptr, kvlen_ptr, bias_ptr, drop_ptr, out_ptr, cnt_ptr, thr_ptr,
                cand_key_ptr, cand_idx_ptr, tie_idx_ptr, sel_ptr, fb_ptr, fb_cnt_ptr, path_ptr, tl.program_id(0),
                S, T, H, K, scale,
                sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sbb, sbs, sbt, sdb, sds, sdt, sor, sok,
                CAUSAL, HAS_KVLEN, HAS_BIAS, HAS_DROP, D, BLOCK_H, FB_BLOCK_T, CHUNK, DIRECT, CAP, TCAP, KP,
                SORTED, FALLBACK_INLINE, RECORD_PATH)


@triton.jit
def _fallback_kernel(
    q_ptr, k_ptr, w_ptr, kvlen_ptr, bias_ptr, drop_ptr, out_ptr, fb_rows_ptr, fb_cnt_ptr, scratch_ptr,
    S, T, H, K, scale,
    sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sbb, sbs, sbt, sdb, sds, sdt, sor, sok,
    CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROP: tl.constexpr,
    D: tl.constexpr, BLOCK_H: tl.constexpr, FB_BLOCK_T: tl.constexpr, CHUNK: tl.constexpr, KP: tl.constexpr,
    SORTED: tl.constexpr,
):
    """A fixed pool of programs, each with a scratch row: program j takes the listed rows j, j + P, ...
    (none: it returns at once). Fixed sizes, so a CUDA graph captures it whatever the count."""
    pid = tl.program_id(0)
    n = tl.load(fb_cnt_ptr).to(tl.int32)
    x_row = scratch_ptr + pid.to(tl.int64) * T
    for i in range(pid, n, tl.num_programs(0)):
        row = tl.load(fb_rows_ptr + i).to(tl.int64)
        _fallback_row(q_ptr, k_ptr, w_ptr, kvlen_ptr, bias_ptr, drop_ptr, out_ptr + row * sor, sok, x_row,
                      row // S, (row % S).to(tl.int32), S, T, H, K, scale,
                      sqb, sqs, sqh, sqd, skb, skt, skd, swb, sws, swh, sbb, sbs, sbt, sdb, sds, sdt,
                      CAUSAL, HAS_KVLEN, HAS_BIAS, HAS_DROP, D, BLOCK_H, FB_BLOCK_T, CHUNK, KP, SORTED)
        tl.debug_barrier()  # the scratch row is rewritten by the next listed row
