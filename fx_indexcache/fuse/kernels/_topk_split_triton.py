"""Triton code of the split-row top-k (``topk.row_topk``'s default for rows longer than the capacity).

No launch holds a long serial chain (see ``topk.py`` for the algorithm). ``_filter_kernel`` (grid rows x
splits) finds the sampled threshold and, per split, either writes the keys above it (one split a row: one
read of the row) or only counts them (several splits: phase 1). For split rows ``_write_kernel`` (phase 2)
then writes each split's survivors at the offset the counts of the splits before it give, so the
candidate buffer keeps index order; for one row (``topk.SELECT_IN_WRITE_ROWS``) the row's last split to
finish then runs the select (a count of finished splits, bumped after a release fence: the classic
last-block pattern). Otherwise ``_select_kernel`` (grid rows) runs the select in a launch of its own.
"""

import triton
import triton.language as tl

from ._topk_triton import _key, _kth_key_any, _select_from_buffers, _sort_selected


@triton.jit
def _sampled_threshold(x_row, sxt, T, R_SAMPLE, NB: tl.constexpr, SB: tl.constexpr):
    """The R_SAMPLE-th largest key of NB blocks of SB contiguous keys spread evenly over the row."""
    starts = (tl.arange(0, NB).to(tl.int64) * T) // NB
    pos = starts[:, None] + tl.arange(0, SB)[None, :]
    sample = tl.reshape(_key(tl.load(x_row + pos * sxt)), [NB * SB])
    return _kth_key_any(sample, R_SAMPLE)


@triton.jit
def _split_base(cnt_ptr, row, split, NSPLIT, NSPLIT_P: tl.constexpr):
    """Keys above / equal to the threshold in the splits before ``split`` (their phase-1 counts; ``split =
    NSPLIT``: the whole row's)."""
    s = tl.arange(0, NSPLIT_P)
    before = s < split
    base = cnt_ptr + (row * NSPLIT + s) * 2
    return (tl.sum(tl.load(base, mask=before, other=0), axis=0),
            tl.sum(tl.load(base + 1, mask=before, other=0), axis=0))


@triton.jit
def _filter_segment(x_row, sxt, ck, ci, ti, L, n_gt, n_eq, lo, hi, K,
                    CHUNK: tl.constexpr, CAP: tl.constexpr, WRITE: tl.constexpr):
    """Count the keys of ``[lo, hi)`` above / equal to ``L`` from the running counts; with ``WRITE``,
    store those above at their places in ``ck`` / ``ci`` and the first ties in ``ti`` (index order)."""
    co_next = lo + tl.arange(0, CHUNK)
    x_next = tl.load(x_row + co_next.to(tl.int64) * sxt, mask=co_next < hi, other=0.0)
    for c in range(0, tl.cdiv(hi - lo, CHUNK)):
        co = co_next
        ok = co < hi
        kc = _key(x_next)
        co_next = co + CHUNK  # the next chunk's load goes out before this one's scans
        x_next = tl.load(x_row + co_next.to(tl.int64) * sxt, mask=co_next < hi, other=0.0)
        gt = ok & (kc > L)
        eq = ok & (kc == L)
        both = gt.to(tl.int32) + (eq.to(tl.int32) << 16)  # one scan and one sum for both counts
        if WRITE:
            run = tl.cumsum(both, axis=0)
            p_gt = n_gt + (run & 0xFFFF) - 1
            p_eq = n_eq + (run >> 16) - 1
            tl.store(ck + p_gt, kc, mask=gt & (p_gt < CAP))
            tl.store(ci + p_gt, co, mask=gt & (p_gt < CAP))
            tl.store(ti + p_eq, co, mask=eq & (p_eq < K))
        tot = tl.sum(both, axis=0)
        n_gt += tot & 0xFFFF
        n_eq += tot >> 16
    return n_gt, n_eq


@triton.jit
def _filter_kernel(
    x_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr, cnt_ptr, thr_ptr, done_ptr,
    T, K, R_SAMPLE, SEG, NSPLIT,
    sxr, sxt,
    NB: tl.constexpr,
    SB: tl.constexpr,
    CHUNK: tl.constexpr,  # at most 32768: a chunk's two counts share one int32 (16 bits each)
    CAP: tl.constexpr,
    WRITE: tl.constexpr,  # the only split of its row writes; several splits only count (phase 1)
):
    """The sampled threshold, then this split's counts (and, with ``WRITE``, its survivors)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    x_row = x_ptr + row * sxr
    L = _sampled_threshold(x_row, sxt, T, R_SAMPLE, NB, SB)
    if split == 0:
        tl.store(thr_ptr + row, L)
        tl.store(done_ptr + row, 0)  # the write phase's count of finished splits starts here
    lo = split * SEG
    n_gt, n_eq = _filter_segment(x_row, sxt, cand_key_ptr + row * CAP, cand_idx_ptr + row * CAP,
                                 tie_idx_ptr + row * K, L, L * 0, L * 0, lo, tl.minimum(lo + SEG, T), K,
                                 CHUNK, CAP, WRITE)
    tl.store(cnt_ptr + (row * NSPLIT + split) * 2, n_gt)
    tl.store(cnt_ptr + (row * NSPLIT + split) * 2 + 1, n_eq)


@triton.jit
def _release_writes(x):
    """Each thread's own stores made visible card-wide before the finished-split count is bumped (PTX
    ``fence.acq_rel.gpu``; a barrier alone orders them for this program only)."""
    return tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _select_row(x_ptr, out_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr, cnt_ptr, thr_ptr, path_ptr, row,
                T, K, NSPLIT, sxr, sxt, sor, sok,
                CHUNK: tl.constexpr, CAP: tl.constexpr, KP: tl.constexpr, NSPLIT_P: tl.constexpr,
                SORTED: tl.constexpr, RECORD_PATH: tl.constexpr, PREFIX_SKIP: tl.constexpr):
    """Step 3 (and 4) of ``topk.py`` for one row, from the filter's buffers and every split's counts."""
    x_row = x_ptr + row * sxr
    o_row = out_ptr + row * sor
    n_gt, n_eq = _split_base(cnt_ptr, row, NSPLIT, NSPLIT, NSPLIT_P)  # every split's counts
    path = _select_from_buffers(x_row, sxt, o_row, sok, cand_key_ptr + row * CAP, cand_idx_ptr + row * CAP,
                                tie_idx_ptr + row * K, tl.load(thr_ptr + row), n_gt, n_eq, T, K, CHUNK, CAP, KP,
                                PREFIX_SKIP)
    if RECORD_PATH:
        tl.store(path_ptr + row, path)
    if SORTED:
        tl.debug_barrier()  # the indices just written are read back by other threads
        _sort_selected(x_row, sxt, o_row, sok, K, KP)


@triton.jit
def _write_kernel(
    x_ptr, out_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr, cnt_ptr, thr_ptr, done_ptr, path_ptr,
    T, K, SEG, NSPLIT,
    sxr, sxt, sor, sok,
    CHUNK: tl.constexpr,  # the write's keys a step
    CAP: tl.constexpr,
    KP: tl.constexpr,
    NSPLIT_P: tl.constexpr,
    SORTED: tl.constexpr,
    RECORD_PATH: tl.constexpr,
    PREFIX_SKIP: tl.constexpr,
    SELECT_CHUNK: tl.constexpr,  # the select's exact fallback's keys a step
    SELECT_LAST: tl.constexpr,  # the row's last split to finish writing also selects (one launch fewer)
    FENCE: tl.constexpr,  # False only under TRITON_INTERPRET (programs run one after another there)
):
    """Phase 2 of a split row: write this split's survivors at the offset the earlier splits' phase-1
    counts give (index order across splits); with ``SELECT_LAST``, the last split of the row to finish
    then runs the select (``_select_row``) on the whole row's buffers."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    L = tl.load(thr_ptr + row)
    n_gt, n_eq = _split_base(cnt_ptr, row, split, NSPLIT, NSPLIT_P)
    lo = split * SEG
    n_gt, n_eq = _filter_segment(x_ptr + row * sxr, sxt, cand_key_ptr + row * CAP, cand_idx_ptr + row * CAP,
                                 tie_idx_ptr + row * K, L, n_gt, n_eq, lo, tl.minimum(lo + SEG, T), K,
                                 CHUNK, CAP, True)
    if SELECT_LAST:
        if FENCE:
            _release_writes(n_gt)
        tl.debug_barrier()  # every thread's stores are fenced before one thread counts this split done
        finished = tl.atomic_add(done_ptr + row, 1, sem="acq_rel", scope="gpu")
        if finished == NSPLIT - 1:  # the others have all written (their fences precede their counts)
            _select_row(x_ptr, out_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr, cnt_ptr, thr_ptr, path_ptr, row,
                        T, K, NSPLIT, sxr, sxt, sor, sok, SELECT_CHUNK, CAP, KP, NSPLIT_P, SORTED, RECORD_PATH,
                        PREFIX_SKIP)


@triton.jit
def _select_kernel(
    x_ptr, out_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr, cnt_ptr, thr_ptr, path_ptr,
    T, K, NSPLIT,
    sxr, sxt, sor, sok,
    CHUNK: tl.constexpr,
    CAP: tl.constexpr,
    KP: tl.constexpr,
    NSPLIT_P: tl.constexpr,
    SORTED: tl.constexpr,
    RECORD_PATH: tl.constexpr,
    PREFIX_SKIP: tl.constexpr,
):
    _select_row(x_ptr, out_ptr, cand_key_ptr, cand_idx_ptr, tie_idx_ptr, cnt_ptr, thr_ptr, path_ptr,
                tl.program_id(0).to(tl.int64), T, K, NSPLIT, sxr, sxt, sor, sok,
                CHUNK, CAP, KP, NSPLIT_P, SORTED, RECORD_PATH, PREFIX_SKIP)


@triton.jit
def _rank_sort_kernel(
    x_ptr, sel_ptr, out_ptr, K,
    sxr, sxt, ssr, sor, sok,
    KP: tl.constexpr,
    RB: tl.constexpr,
):
    """Sorted output for few rows: each program places RB of the K selected indices at their rank
    (the number of selected entries with a larger score, or an equal score and a lower index), so a
    row's sort is spread over K / RB programs instead of one bitonic network on one SM."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * sxr
    s_row = sel_ptr + row * ssr
    kk = tl.arange(0, KP)
    okk = kk < K
    all_idx = tl.load(s_row + kk, mask=okk, other=0)
    all_key = _key(tl.load(x_row + all_idx.to(tl.int64) * sxt, mask=okk, other=0.0))
    mine = tl.program_id(1) * RB + tl.arange(0, RB)
    okm = mine < K
    my_idx = tl.load(s_row + mine, mask=okm, other=0)
    my_key = _key(tl.load(x_row + my_idx.to(tl.int64) * sxt, mask=okm, other=0.0))
    ahead = (all_key[None, :] > my_key[:, None]) | (
        (all_key[None, :] == my_key[:, None]) & (all_idx[None, :] < my_idx[:, None]))
    rank = tl.sum((ahead & okk[None, :]).to(tl.int32), axis=1)
    tl.store(out_ptr + row * sor + rank.to(tl.int64) * sok, my_idx, mask=okm)
