"""The Triton code of ``topk.row_topk`` (module level, so the jit functions can call each other, also under
``TRITON_INTERPRET=1``). Imported only when a kernel is launched; see ``topk.py`` for the algorithm."""

import triton
import triton.language as tl


@triton.jit
def _key(x):
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x == 0.0, 0, key)  # -0.0 ties with +0.0, as the floats do

@triton.jit
def _count_bins(bins_ptr, rows, scores, mask, ROW_BINS: tl.constexpr, ROW_BIN_SHIFT: tl.constexpr):
    """Each score where ``mask`` holds counted into its row's bin of the CUDA top-k's binned counts
    (``topk_cuda.row_bins``: the key as the CUDA kernel's unsigned one, ``_key`` offset by 2^31, >> ROW_BIN_SHIFT;
    ``rows`` broadcasts against ``scores``)."""
    bins = (_key(scores).to(tl.uint32, bitcast=True) ^ 0x80000000) >> ROW_BIN_SHIFT
    tl.atomic_add(bins_ptr + rows * ROW_BINS + bins.to(tl.int64), mask.to(tl.int32), mask=mask)


@triton.jit
def _write_selected(o_row, sok, keys, idxs, thr, K):
    """Store the indices of keys > thr (in the order given), then the first ties, K in all."""
    gt = keys > thr
    eq = keys == thr
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    pos_gt = tl.cumsum(gt.to(tl.int32), axis=0) - 1
    pos_eq = tl.cumsum(eq.to(tl.int32), axis=0) - 1
    take = gt | (eq & (pos_eq < K - n_gt))
    dest = tl.where(gt, pos_gt, n_gt + pos_eq)
    tl.store(o_row + dest.to(tl.int64) * sok, idxs, mask=take)

@triton.jit
def _exact_from_memory(x_row, sxt, o_row, sok, T, K, CHUNK: tl.constexpr):
    """Fallback: the bitwise search with every count a pass over the row in memory; then the write."""
    thr = tl.full([], -2147483648, tl.int32)
    for i in range(32):
        if i == 0:
            cand = thr * 0
        else:
            cand = thr + (1 << (31 - i))
        cnt = thr * 0
        for c in range(0, tl.cdiv(T, CHUNK)):
            co = c * CHUNK + tl.arange(0, CHUNK)
            ok = co < T
            kc = _key(tl.load(x_row + co.to(tl.int64) * sxt, mask=ok, other=0.0))
            cnt += tl.sum((ok & (kc >= cand)).to(tl.int32), axis=0)
        thr = tl.where(cnt >= K, cand, thr)
    n_gt = thr * 0
    for c in range(0, tl.cdiv(T, CHUNK)):
        co = c * CHUNK + tl.arange(0, CHUNK)
        ok = co < T
        kc = _key(tl.load(x_row + co.to(tl.int64) * sxt, mask=ok, other=0.0))
        n_gt += tl.sum((ok & (kc > thr)).to(tl.int32), axis=0)
    base_gt = n_gt * 0
    base_eq = n_gt * 0
    for c in range(0, tl.cdiv(T, CHUNK)):
        co = c * CHUNK + tl.arange(0, CHUNK)
        ok = co < T
        kc = _key(tl.load(x_row + co.to(tl.int64) * sxt, mask=ok, other=0.0))
        gt = ok & (kc > thr)
        eq = ok & (kc == thr)
        pos_gt = base_gt + tl.cumsum(gt.to(tl.int32), axis=0) - 1
        pos_eq = base_eq + tl.cumsum(eq.to(tl.int32), axis=0) - 1
        take = gt | (eq & (pos_eq < K - n_gt))
        dest = tl.where(gt, pos_gt, n_gt + pos_eq)
        tl.store(o_row + dest.to(tl.int64) * sok, co, mask=take)
        base_gt += tl.sum(gt.to(tl.int32), axis=0)
        base_eq += tl.sum(eq.to(tl.int32), axis=0)

@triton.jit
def _kth_key(keys, K, lo, hi):
    """The K-th largest of ``keys`` (int32, padding INT_MIN), known to lie in ``[lo, hi]``: the sign bit, bit 30,
    then 15 steps of two bits, the three counts of a step packed in one int64 sum (21 bits each: at most
    2^21 - 1 keys). The high bits ``lo`` and ``hi`` share are the K-th key's too: those steps take them and
    skip their count (``lo = INT_MIN, hi = INT_MAX`` share none: every step counts)."""
    if (lo >> 30) == (hi >> 30):
        thr = (lo >> 30) << 30
    else:
        n_nonneg = tl.sum((keys >= 0).to(tl.int32), axis=0)
        thr = tl.where(n_nonneg >= K, 0, -2147483648)
        c = thr + (1 << 30)
        thr = tl.where(tl.sum((keys >= c).to(tl.int32), axis=0) >= K, c, thr)
    for i in range(15):
        b = 28 - 2 * i  # this step decides bits b+1 and b
        if (lo >> b) == (hi >> b):
            thr = (lo >> b) << b
        else:
            c1 = thr + (1 << b)
            c2 = thr + (2 << b)
            c3 = thr + (3 << b)
            packed = ((keys >= c1).to(tl.int64) + ((keys >= c2).to(tl.int64) << 21)
                      + ((keys >= c3).to(tl.int64) << 42))
            s = tl.sum(packed, axis=0)
            n1 = (s & 0x1FFFFF).to(tl.int32)
            n2 = ((s >> 21) & 0x1FFFFF).to(tl.int32)
            n3 = (s >> 42).to(tl.int32)
            thr = tl.where(n3 >= K, c3, tl.where(n2 >= K, c2, tl.where(n1 >= K, c1, thr)))
    return thr


@triton.jit
def _kth_key_any(keys, K):
    """``_kth_key`` with no bounds known: every step counts."""
    return _kth_key(keys, K, -2147483648, 2147483647)


@triton.jit
def _select_from_buffers(x_row, sxt, o_row, sok, ck, ci, ti, L, n_gt, n_eq, T, K,
                         CHUNK: tl.constexpr, CAP: tl.constexpr, KP: tl.constexpr, PREFIX_SKIP: tl.constexpr):
    """Step 3 of the module doc, from a filter's buffers (``n_gt`` candidates above the threshold ``L`` in ``ck``
    / ``ci``, the first ties in ``ti``): write the row's K indices; return the path taken (1, 2 or 3).
    ``PREFIX_SKIP``: the search skips the high bits that ``L + 1`` and the largest candidate share."""
    offs = tl.arange(0, CAP)
    if (n_gt <= CAP) & (n_gt >= K):
        # the K-th key lies above the threshold: select among the candidates (index order kept)
        okc = offs < n_gt
        keys = tl.load(ck + offs, mask=okc, other=-2147483648)
        if PREFIX_SKIP:  # the K-th key lies in [L + 1, max]: one max instead of the shared bits' counts
            kth = _kth_key(keys, K, L + 1, tl.max(keys, axis=0))
        else:
            kth = _kth_key_any(keys, K)
        # the indices are loaded only now: not held in registers through the search
        _write_selected(o_row, sok, keys, tl.load(ci + offs, mask=okc, other=0), kth, K)
        path = 1
    elif (n_gt <= CAP) & (n_gt + n_eq >= K):
        # the K-th key is the threshold: every candidate, then the lowest-indexed ties
        okc = offs < n_gt
        tl.store(o_row + offs.to(tl.int64) * sok, tl.load(ci + offs, mask=okc, other=0), mask=okc)
        kk = tl.arange(0, KP)
        okt = kk < K - n_gt
        tl.store(o_row + (n_gt + kk).to(tl.int64) * sok, tl.load(ti + kk, mask=okt, other=0), mask=okt)
        path = 2
    else:  # the sample misled: exact, from memory (slow, never wrong)
        _exact_from_memory(x_row, sxt, o_row, sok, T, K, CHUNK)
        path = 3
    return path

@triton.jit
def _sort_selected(x_row, sxt, o_row, sok, K, KP: tl.constexpr):
    """Sort the K written indices by descending score, ties by ascending index (one packed int64 sort)."""
    kk = tl.arange(0, KP)
    okk = kk < K
    sel = tl.load(o_row + kk.to(tl.int64) * sok, mask=okk, other=0)
    sv = _key(tl.load(x_row + sel.to(tl.int64) * sxt, mask=okk, other=0.0))
    low = tl.full([KP], 0xFFFFFFFF, tl.int64)
    packed = (sv.to(tl.int64) << 32) | (low - sel.to(tl.int64))
    packed = tl.where(okk, packed, tl.full([KP], 1, tl.int64) << 63)  # INT64_MIN: after every real entry
    srt = tl.sort(packed, descending=True)
    idx = (low - (srt & low)).to(tl.int32)
    tl.store(o_row + kk.to(tl.int64) * sok, idx, mask=okk)

@triton.jit
def _topk_kernel(
    x_ptr, out_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr, path_ptr,
    T, K, R_SAMPLE,
    sxr, sxt, sor, sok,
    DIRECT: tl.constexpr,
    NB: tl.constexpr,
    SB: tl.constexpr,
    CHUNK: tl.constexpr,
    CAP: tl.constexpr,
    KP: tl.constexpr,
    SORTED: tl.constexpr,
    RECORD_PATH: tl.constexpr,
    PREFIX_SKIP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * sxr
    o_row = out_ptr + row * sor
    offs = tl.arange(0, CAP)
    if DIRECT:  # the whole row is the candidate set
        ok = offs < T
        keys = tl.where(ok, _key(tl.load(x_row + offs * sxt, mask=ok, other=0.0)), -2147483648)
        _write_selected(o_row, sok, keys, offs, _kth_key_any(keys, K), K)
        path = 0
    else:
        # 1. threshold from an evenly spread sample of NB blocks of SB keys
        starts = (tl.arange(0, NB).to(tl.int64) * T) // NB
        pos = starts[:, None] + tl.arange(0, SB)[None, :]
        sample = tl.reshape(_key(tl.load(x_row + pos * sxt)), [NB * SB])
        L = _kth_key_any(sample, R_SAMPLE)
        # 2. filter: keys > L to the candidate buffer, the first K keys == L to the tie buffer
        ck = cand_key_ptr + row * CAP
        ci = cand_idx_ptr + row * CAP
        ti = tie_idx_ptr + row * KP
        n_gt = L * 0
        n_eq = L * 0
        co_next = tl.arange(0, CHUNK)
        x_next = tl.load(x_row + co_next.to(tl.int64) * sxt, mask=co_next < T, other=0.0)
        for c in range(0, tl.cdiv(T, CHUNK)):
            co = co_next
            ok = co < T
            kc = _key(x_next)
            co_next = co + CHUNK  # prefetch the next chunk before this one's scans
            x_next = tl.load(x_row + co_next.to(tl.int64) * sxt, mask=co_next < T, other=0.0)
            gt = ok & (kc > L)
            eq = ok & (kc == L)
            p_gt = n_gt + tl.cumsum(gt.to(tl.int32), axis=0) - 1
            p_eq = n_eq + tl.cumsum(eq.to(tl.int32), axis=0) - 1
            tl.store(ck + p_gt, kc, mask=gt & (p_gt < CAP))
            tl.store(ci + p_gt, co, mask=gt & (p_gt < CAP))
            tl.store(ti + p_eq, co, mask=eq & (p_eq < K))
            n_gt += tl.sum(gt.to(tl.int32), axis=0)
            n_eq += tl.sum(eq.to(tl.int32), axis=0)
        tl.debug_barrier()  # the buffers are read back by other threads of this program
        path = _select_from_buffers(x_row, sxt, o_row, sok, ck, ci, ti, L, n_gt, n_eq, T, K, CHUNK, CAP, KP,
                                    PREFIX_SKIP)
    if RECORD_PATH:  # which way the row went: 0 direct, 1 candidates, 2 threshold ties, 3 fallback
        tl.store(path_ptr + row, path)
    if SORTED:
        tl.debug_barrier()  # the indices just written are read back by other threads
        _sort_selected(x_row, sxt, o_row, sok, K, KP)
