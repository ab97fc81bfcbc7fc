"""Row-wise top-k of fp32 logits: a sampled threshold, a filtering pass, an exact select on chip.

Two implementations of the one algorithm below: Triton kernels (``_topk_triton.py``, ``_topk_split_triton.py``;
every GPU, and the CPU interpreter) and a CUDA C++ kernel (``topk_cuda.cu``, compiled at first use by NVRTC;
one launch a call), the default from ``CUDA_MIN_ROWS`` rows where it loads (``default_algorithm``). Both give
the same indices (same plan, tie rule and order); where a NaN with the sign bit set ranks is not promised
(the CUDA kernel adds 0.0 to each score first, which the hardware may return as the positive NaN).

Scores become order-preserving int32 keys (a float's bits with the magnitude bits of negatives flipped
compare like the floats; -0.0 is mapped to +0.0; NaN sorts above +inf, as in ``torch.topk``). Rows of at
most ``cap`` keys are selected directly in registers, one program a row. Longer rows (the default,
"split" algorithm; ``_topk_split_triton.py``):

1. **Sample.** ``NB`` blocks of ``SB`` contiguous keys spread evenly over the row; the ``r``-th largest
   sample key is a threshold ``L`` that, for ``r`` a few standard deviations above the expected count
   ``k * NS / T``, has at least ``k`` and at most ``cap`` keys of the row above it (exact bitwise search
   of the sample in registers, two bits a step).
2. **Filter** (grid rows x splits, a lean kernel so that many programs stream at once). Keys ``> L`` go,
   in index order, to a per-row candidate buffer (capacity ``cap``); keys ``== L`` to a tie buffer (the
   first ``k``, in index order). With enough rows (``split_plan``) one program reads its row once and
   writes; with few rows (decode) each row is cut into up to ``TARGET_PROGRAMS / rows`` splits that
   first count, then write at the offset the earlier splits' counts give (the row's second read comes
   from L2), so index order holds across splits.
3. **Select** (a program a row: a launch of grid rows; for a single split row, decode at batch 1, the
   row's last split to finish writing, so no launch of its own: ``SELECT_IN_WRITE_ROWS``). If at least
   ``k`` keys lie above ``L``, the exact k-th key among the candidates is found by the bitwise search in
   registers; else the k-th key is ``L`` itself and the ties fill up. If the sample misled (fewer than
   ``k`` keys ``>= L``, or more than ``cap`` above it), the program falls back to the exact bitwise
   search over the whole row read from memory (slow, never wrong).
4. **Sort** (``sorted=True``): a bitonic ``tl.sort`` of packed (key, ~index) pairs in the select
   program, or, for few rows (``rank_sort_wins``), a rank sort spread over ``k / RB`` programs a row.

``algorithm="one_program"`` (``_launch``) is run 4's single kernel doing 1-4 in one program a row.

Output (int32 indices): every key above the k-th key in index order, then the lowest-indexed keys equal
to it. **Tie rule**: among keys equal to the k-th largest, the lowest indices are taken (torch.topk's
choice is unspecified), so the *set* equals torch.topk's except at exact ties. ``-inf`` (masked) keys
can only be selected as ties and come after every finite one. ``sorted=True``: descending score, equal
scores by ascending index (a stable sort).

Everything stays on the device (no host sync, fixed-size buffers allocated per call, launch shapes from
the input's shape only): safe to capture in a CUDA graph. Measured against torch.topk in
``benchmarks/bench_indexer_kernel.py``.
"""

import functools
import math
import os
from typing import Optional

import torch

#: Longest row the kernel takes (indices are int32 and the scratch is per row).
MAX_ROW = 1 << 22
#: Largest k the kernel takes (the sorted path sorts k entries in registers).
MAX_K = 8192


@functools.lru_cache(maxsize=None)
def _kernels():
    try:
        from . import _topk_triton
    except Exception:  # pragma: no cover - no usable Triton here
        return None
    from . import _topk_split_triton

    split = _topk_split_triton
    return {"topk": _topk_triton._topk_kernel, "filter": split._filter_kernel, "write": split._write_kernel,
            "select": split._select_kernel, "rank_sort": split._rank_sort_kernel}


def _interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (programs one after another, no inline PTX)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


#: Standard deviations of margin on both sides of the sampled threshold: fewer than k keys above it, or more
#: than the capacity, each happen for a few rows in a million. (Run 5 took 4 on one side with a fixed
#: capacity: ~1 row in 1000 fell back to the slow exact search at 64K-128K keys.)
MARGIN_SD = 4.5


def plan(T: int, k: int, *, cap: Optional[int] = None, sample: Optional[int] = None) -> dict:
    """Launch constants for rows of T keys: candidate capacity, sample shape and rank (see module doc).

    The sample rank ``r`` is ``MARGIN_SD`` standard deviations (plus one) above the expected number of
    sampled keys among the row's top k, so a threshold below the k-th key is the rule; the capacity is
    the row rank at which ``r`` sampled keys lie ``MARGIN_SD`` deviations below their expected count
    (at least 4096 and 2k). Both only decide speed: a missed estimate falls back, exactly.
    """
    kp = max(16, _pow2(k))  # tiny blocks make odd layouts: never below 16 lanes
    if sample is None:  # about 32 sampled keys expected in the top k (a relative spread of ~18 %)
        sample = min(16384, max(2048, _pow2(math.ceil(32 * T / k))))
    sample = _pow2(sample)
    while sample > T:
        sample //= 2
    p = k / T
    mu = sample * p
    r = max(1, min(sample, int(math.ceil(mu + MARGIN_SD * math.sqrt(mu * (1.0 - p)) + 1.0))))
    if cap is None:  # m sampled keys expected above the capacity's rank, with (m - r) / sqrt(m) = MARGIN_SD
        m = ((MARGIN_SD + math.sqrt(MARGIN_SD**2 + 4 * r)) / 2) ** 2
        cap = max(4096, 2 * kp, math.ceil(m * T / sample))
    cap = _pow2(cap)
    direct = T <= cap
    sb = min(32, sample)
    nb = sample // sb
    if direct:
        cap = max(16, _pow2(T))
    return dict(DIRECT=direct, NB=nb, SB=sb, CAP=cap, KP=kp, R_SAMPLE=r, CHUNK=min(2048, cap))


def supported(logits: torch.Tensor, k: int) -> bool:
    """Whether ``row_topk`` takes this input (CUDA fp32, 1 <= k <= min(row length, MAX_K), rows <= MAX_ROW)."""
    if not (isinstance(logits, torch.Tensor) and logits.is_cuda and logits.dtype == torch.float32):
        return False
    if logits.dim() < 1 or logits.numel() == 0:
        return False
    T = logits.shape[-1]
    return 1 <= k <= min(T, MAX_K) and T <= MAX_ROW and _kernels() is not None


#: From this many rows (one block a row) the CUDA kernel is the default where it loads: run 8 (H200, torch 2.11,
#: CUDA 13.0; benchmarks/results/topk_cuda_run8.json) measured it 2.1-2.6x faster than the Triton split kernels
#: there, unsorted; for fewer rows (split rows, decode) the Triton kernels were faster or within 6 %, so they stay.
CUDA_MIN_ROWS = 256
#: The shortest rows the CUDA kernel was measured on (and won against torch.topk there, sorted and unsorted).
CUDA_MIN_T = 8192
#: The wide kernel's (run 9: 1-200 rows of 8K-256K keys, in a CUDA graph and eagerly, unsorted: 1 x 8K 18.6 /
#: 44.0 us graph / eager against torch's 42.0 / 46.7, 1 x 32K 20.5 / 49.6 against 42.6 / 105.1, 64 x 32K 22.1 /
#: 52.5 against 68.4 / 113.2, 1 x 256K 62.1 / 69.8 against 63.0 / 82.2); sorted, in a graph, from 32K keys
#: (1 x 32K 40.7 against torch's unsorted 42.6, 64 x 32K 42.4 against 68.4; 1 x 8K 38.7 against 42.0 only).
CUDA_WIDE_MIN_T = 8192
CUDA_WIDE_SORTED_MIN_T = 32768


def faster_than_torch(rows: int, T: int, k: int, sorted: bool, *, in_cuda_graph: bool = False,
                      algorithm: str = "split") -> bool:
    """Whether ``algorithm`` ("cuda", "cuda_wide", "cuda_cluster" or the Triton "split") measured faster than
    torch.topk here.

    "cuda": from ``CUDA_MIN_ROWS`` rows of at least ``CUDA_MIN_T`` keys (run 8: 1024 x 32K 0.111 / 0.212 ms
    unsorted / sorted against torch's 0.494 / 0.551; 256-4096 rows of 8K-256K keys 2.4-5.2x unsorted, 1.2-4.3x
    sorted), or in a CUDA graph the one long row ``split_cuda_wins`` takes. "cuda_wide": rows of at least
    ``CUDA_WIDE_MIN_T`` keys (``CUDA_WIDE_SORTED_MIN_T`` sorted). "cuda_cluster": in a CUDA graph, the one long
    row ``cluster_wins`` takes (faster there than "cuda", which beat torch).
    "split" (H200, torch 2.11, Triton 3.6, run 5 of 2026-12-01: benchmarks/results/indexer_kernel_topk_run2.md):

    Replayed in a CUDA graph (``in_cuda_graph``: launch costs gone), decode batches of 1-64 rows of
    32K-128K keys win, sorted and unsorted (logits + top-k 1.0-2.1x faster than with torch.topk).
    Eagerly, few rows lose to the host cost of three or four Triton launches (~20 us each); the kernel
    wins from 256 rows at 16K-32K keys (1024 x 32K: 1.2x sorted, 1.9x unsorted) and past 128K keys
    (256 x 256K: 1.6x / 1.8x); it lost at 64K-128K keys (a row in a thousand took the slow exact
    fallback there, before ``MARGIN_SD``; not re-measured since) and at 8K keys; unmeasured shapes go
    to torch.topk.
    """
    if algorithm == "cuda":  # one split row: measured in CUDA graphs only (split_cuda_wins)
        return (rows >= CUDA_MIN_ROWS and T >= CUDA_MIN_T) or (in_cuda_graph and split_cuda_wins(rows, T, sorted))
    if algorithm == "cuda_cluster":  # faster than "cuda" where that beat torch, also measured in graphs only
        return in_cuda_graph and cluster_wins(rows, T, sorted)
    if algorithm == "cuda_wide":  # sorted adds a bitonic sort (~20 us): measured ahead from 32K keys
        return T >= (CUDA_WIDE_SORTED_MIN_T if sorted else CUDA_WIDE_MIN_T)
    if in_cuda_graph and rows <= 64 and 32768 <= T <= 131072:
        return True
    if rows < 256:
        return False
    return 16384 < T <= 32768 or T > 131072


#: About this many programs keep the card's 132 SMs streaming: fewer rows are split into more programs.
TARGET_PROGRAMS = 1024
#: No split shorter than this (a split also recomputes the sampled threshold).
MIN_SPLIT = 1024
#: From this many rows one program a row streams fastest (run 5: 256 x 256K unsorted 0.37 ms with one
#: split a row, 0.47 with two or four; 1024 x 32K 0.27 with one, 0.31 / 0.36 with two / four).
ONE_SPLIT_ROWS = 256
#: Keys a step of a one-split filter (run 6, H200: 1024 x 32K filter 0.136-0.162 ms with 1024, 0.167-0.192 with
#: 2048 (122 against 202 registers); 1024 x 128K 0.53 against 0.64). Split rows keep 2048 (64 x 32K: equal).
ONE_SPLIT_CHUNK = 1024


#: Split rows up to this many: the row's last split to finish writing runs the select (no launch of its own).
#: Run 7 (H200, CUDA-graph replay, unsorted / sorted us): 1 x 32K 20.4 / 26.7 against 21.3 / 27.2 with a select
#: launch, 1 x 128K 28.8 / 34.4 against 28.4 / 33.6 (equal); from 4 rows slower (16 x 32K 38.9 against 32.1,
#: 64 x 32K 60.8 against 53.0, 4 x 128K 44.3 against 38.7): the select code's registers slow every write program,
#: and the rows' selects crowd the SMs the last splits ran on.
SELECT_IN_WRITE_ROWS = 1


def split_plan(R: int, T: int, splits: Optional[int] = None, *, chunk: Optional[int] = None) -> dict:
    """How the filtering pass cuts each row: ``NSPLIT`` programs of ``SEG`` keys (chunks of ``CHUNK``).

    ``ONE_SPLIT_ROWS`` rows or more: one program a row (one read of the row); fewer rows are cut into
    up to ``TARGET_PROGRAMS / R`` splits (never shorter than ``MIN_SPLIT``), which count first and write
    second (the second read of a short row comes from L2).
    """
    if splits is None and R >= ONE_SPLIT_ROWS:
        splits = 1
    elif splits is None:
        splits = max(1, min(TARGET_PROGRAMS // max(R, 1), T // MIN_SPLIT))
        splits = 1 << (splits.bit_length() - 1)
    splits = max(1, min(int(splits), T))
    chunk = min(chunk or (ONE_SPLIT_CHUNK if splits == 1 else 2048), _pow2(-(-T // splits)))
    seg = -(-(-(-T // splits)) // chunk) * chunk
    nsplit = -(-T // seg)
    return dict(NSPLIT=nsplit, SEG=seg, CHUNK=chunk, NSPLIT_P=max(2, _pow2(nsplit)))


#: ``_launch``'s algorithms.
ALGORITHMS = ("auto", "cuda", "cuda_wide", "cuda_cluster", "split", "one_program")


def _launch(x2d: torch.Tensor, out2d: torch.Tensor, k: int, num_warps: Optional[int] = None, *,
            sorted: bool = False, cap: Optional[int] = None, sample: Optional[int] = None,
            path: Optional[torch.Tensor] = None, splits: Optional[int] = None, algorithm: str = "auto",
            sort: str = "auto", tune: Optional[dict] = None, bins: Optional[torch.Tensor] = None):
    """Launch on ``[R, T]`` rows into ``out2d [R, k]`` (no input checks; runs under TRITON_INTERPRET too).

    ``algorithm``: "cuda" (``topk_cuda``: the same plan in one CUDA C++ launch, compiled by NVRTC),
    "cuda_wide" (the CUDA kernel with 1024-thread blocks, one a row unless ``splits`` cuts it: for few rows),
    "cuda_cluster" (sm_90+: a row over the eight 1024-thread blocks of a thread-block cluster, candidates gathered
    through distributed shared memory; the default for one long row, ``cluster_wins``; a direct plan runs
    "cuda_wide"),
    "split" (Triton: a filter launch, then the select; rows split over programs when few), "one_program"
    (run 4's single Triton kernel, one program a row; kept to measure against) or "auto" (the default:
    ``default_algorithm``). With Triton, rows of at most the capacity always go to the
    single kernel's direct path. ``path`` (int32 ``[R]``), when
    given, receives the way each row went: 0 direct, 1 candidates above the sampled threshold, 2 the
    threshold is the k-th key (ties fill up), 3 the exact fallback; the CUDA kernel's one block a contiguous row
    records its candidates' way as 4 (the k-th key ranked in the filter's counted bin) or 5 (that bin searched by
    passes). ``sort`` (split algorithm, sorted
    output): "bitonic" (``tl.sort`` in the select program), "rank" (``K / RB`` programs a row place the
    selected at their ranks) or "auto" (``rank_sort_wins``). ``tune`` (split algorithm; benchmarks): launch
    overrides ``filter_warps``, ``select_warps``, ``chunk`` (the filter's keys a step), ``select_in_write``
    (split rows: whether the last split selects; default ``SELECT_IN_WRITE_ROWS``), ``prefix_skip`` (split
    rows: the k-th key's search skips the bits its known bounds share; off: run 8 measured it 0.3-1 us slower).
    ``bins`` ("cuda_wide", one block a contiguous sampled row; ``topk_cuda.row_bins``): the rows' keys counted in
    fixed key ranges, from which the threshold comes instead of a sample (a producer's counts; benchmarks).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"_launch: algorithm={algorithm!r}, expected one of {ALGORITHMS}")
    if sort not in ("auto", "bitonic", "rank"):
        raise ValueError(f"_launch: sort={sort!r}, expected 'auto', 'bitonic' or 'rank'")
    p = plan(x2d.shape[1], k, cap=cap, sample=sample)
    if algorithm == "auto":
        algorithm = default_algorithm(x2d, k, sorted, p=p, splits=splits)
    if algorithm == "cuda_cluster":
        from . import topk_cuda

        why = topk_cuda.cluster_reason(x2d.device) if x2d.is_cuda else "the rows are not on a CUDA device"
        if why is not None:
            raise ValueError(f"_launch: algorithm='cuda_cluster' is unavailable here: {why}")
        if not p["DIRECT"]:
            return topk_cuda.launch(x2d, out2d, k, p, topk_cuda.cluster_split_plan(x2d.shape[1]), sorted, path,
                                    cluster=True)
        algorithm = "cuda_wide"
    if bins is not None and algorithm != "cuda_wide":
        raise ValueError(f"_launch: bins are taken by algorithm='cuda_wide' only, got algorithm={algorithm!r}")
    if algorithm in ("cuda", "cuda_wide"):
        from . import topk_cuda

        sp = cuda_split_plan(x2d.shape[0], x2d.shape[1], splits, wide=algorithm == "cuda_wide")
        return topk_cuda.launch(x2d, out2d, k, p, sp, sorted, path, wide=algorithm == "cuda_wide", bins=bins)
    if p["DIRECT"] or algorithm == "one_program":
        return _launch_one_program(x2d, out2d, k, p, num_warps, sorted, path)
    rank = sorted and (sort == "rank" or (sort == "auto" and rank_sort_wins(x2d.shape[0], k)))
    tune = tune or {}
    sp = split_plan(x2d.shape[0], x2d.shape[1], splits, chunk=tune.get("chunk"))
    return _launch_split(x2d, out2d, k, p, sp, sorted, path, rank, tune)


def default_algorithm(x2d: torch.Tensor, k: int, sorted: bool, *, p: Optional[dict] = None,
                      splits: Optional[int] = None) -> str:
    """What ``_launch(algorithm="auto")`` runs: ``preferred_algorithm`` where the CUDA kernel applies, else the
    Triton "split" kernels (also for fewer than ``CUDA_MIN_ROWS`` rows when the caller fixes the split count)."""
    p = p or plan(x2d.shape[-1], k)
    R, T = x2d.shape
    clusters = cluster_wins(R, T, sorted) and cluster_applies(x2d, p, sorted)  # (asked only where they would win)
    choice = preferred_algorithm(R, T, sorted, clusters=clusters)
    if choice == "split" or (R < CUDA_MIN_ROWS and splits is not None):
        return "split"
    if choice == "cuda_cluster":
        return choice
    return choice if cuda_applies(x2d, p, splits, sorted, wide=choice == "cuda_wide") else "split"


def preferred_algorithm(R: int, T: int, sorted: bool, *, clusters: bool = True) -> str:
    """The fastest of our kernels measured for ``R`` rows of ``T`` keys, where the CUDA kernel loads: "cuda" from
    ``CUDA_MIN_ROWS`` rows; for fewer, "cuda_cluster" (``cluster_wins``, on a card with ``clusters``), "cuda"
    (``split_cuda_wins``), "cuda_wide" (``wide_wins``) or "split"."""
    if clusters and cluster_wins(R, T, sorted):
        return "cuda_cluster"
    if R >= CUDA_MIN_ROWS or split_cuda_wins(R, T, sorted):
        return "cuda"
    return "cuda_wide" if wide_wins(R, T, sorted) else "split"


#: Fewer than ``CUDA_MIN_ROWS`` rows (decode) go to the wide CUDA kernel (one 1024-thread block a row) up to
#: ``CUDA_WIDE_T`` keys a row; longer rows (and sorted output: its bitonic sort on one SM, ~20 us, loses to the
#: Triton rank sort spread over programs for few rows), up to ``CUDA_WIDE_MAX_T``, from ``CUDA_WIDE_LONG_ROWS``
#: rows (sorted: 1 x 32K 40.7 against 26.0 us, 4 x 32K 40.7 / 33.0, 16 x 32K 41.8 / 71.9). Run 9
#: (H200, torch 2.11, CUDA 13.0, CUDA-graph replay, unsorted, us; benchmarks/results/topk_cuda_run9.json): wide
#: against the Triton split kernels 1 x 32K 20.5 / 20.6, 64 x 32K 22.1 / 53.0, 64 x 8K 19.0 / 31.2, 16 x 128K
#: 40.8 / 59.5, 64 x 128K 41.0 / 95.0; but 1 x 128K 39.1 / 27.7, 4 x 128K 39.5 / 37.5, 1 x 256K 62.1 / 37.9 (one
#: SM reads a long row slower than many split programs).
CUDA_WIDE_T = 32768
CUDA_WIDE_LONG_ROWS = 16
CUDA_WIDE_MAX_T = 131072


def wide_wins(R: int, T: int, sorted: bool = False) -> bool:
    """Whether one 1024-thread block a row beats the Triton split kernels for ``R < CUDA_MIN_ROWS`` rows."""
    if R >= CUDA_MIN_ROWS or T > CUDA_WIDE_MAX_T:
        return False
    return R >= CUDA_WIDE_LONG_ROWS or (T <= CUDA_WIDE_T and not sorted)


#: One row (decode at batch 1) longer than ``CUDA_WIDE_T`` keys, up to ``CUDA_SPLIT_MAX_T``, unsorted: the
#: 256-thread CUDA kernel with the row split over blocks. CUDA-graph replay, us, against the Triton split kernels
#: (runs 9 and 10, H200, torch 2.11, CUDA 13.0; benchmarks/results/topk_cuda_run{9,10}.json): 1 x 64K 25.0 / 27.5
#: and 23.9 / 27.4, 1 x 128K 26.0 / 27.7 and 27.4 / 27.9, 1 x 256K 32.8 / 37.9 and 31.0 / 38.1 (torch.topk 45.5,
#: 52.3, 63.0). From 4 rows, and sorted, the Triton kernels were ahead (4 x 128K 40.3 / 37.5 and 38.0 / 37.5; 1 x
#: 128K sorted 48.9 / 33.1: the bitonic sort in one block).
CUDA_SPLIT_MAX_T = 262144


def split_cuda_wins(R: int, T: int, sorted: bool = False) -> bool:
    """Whether the 256-thread CUDA kernel, its row split over blocks, beats the Triton and wide kernels."""
    return R == 1 and not sorted and CUDA_WIDE_T < T <= CUDA_SPLIT_MAX_T


#: One row longer than ``CUDA_WIDE_T`` keys, up to ``CUDA_SPLIT_MAX_T``, unsorted, on a card with thread-block
#: clusters (sm_90+): the row over the eight 1024-thread blocks of a cluster. CUDA-graph replay on an H100 80GB
#: (torch 2.11, CUDA 13.0; benchmarks/results/topk_cluster_long_rows_h28_h100_fc66ec8.json), top-k alone
#: against the default before it (the split 256-thread kernel), us: 1 x 64K 20.3 / 23.2, 1 x 128K 19.3 / 25.8,
#: 1 x 256K 21.7 / 28.4 (logits + top-k 28.8 / 32.1, 32.4 / 40.7, 52.8 / 62.0). Not at 1 x 8K-32K (19.5 against
#: 15.4-17.4 for the wide block) nor for many rows (64 x 32K: 74.7 against 18.6): the cluster's barrier and gather
#: cost the same at every length.
def cluster_wins(R: int, T: int, sorted: bool = False) -> bool:
    """Whether a thread-block cluster a row beats the other kernels (where the card has clusters)."""
    return split_cuda_wins(R, T, sorted)


def cluster_applies(x2d: torch.Tensor, p: dict, sorted: bool) -> bool:
    """Whether the cluster kernels take these rows: a CUDA device with clusters where they loaded, a sampled plan
    (a direct one is the wide block's), and their shared memory within the device's limit."""
    if not x2d.is_cuda or _interpreted() or p["DIRECT"]:
        return False
    from . import topk_cuda

    if topk_cuda.cluster_reason(x2d.device) is not None:
        return False
    return topk_cuda.fits(x2d.device.index, p, topk_cuda.CLUSTER, sorted, cluster=True)


def cuda_split_plan(R: int, T: int, splits: Optional[int], wide: bool) -> dict:
    """The CUDA kernel's cut of each row: ``split_plan``'s, but one split a row for ``wide`` blocks unless
    ``splits`` asks for more (a 1024-thread block fills an SM; its splits are for measuring few long rows)."""
    return split_plan(R, T, (splits or 1) if wide else splits)


def cuda_applies(x2d: torch.Tensor, p: dict, splits: Optional[int], sorted: bool, wide: bool = False) -> bool:
    """Whether the CUDA kernel takes these rows: on a GPU where it compiled and loaded, with its shared
    memory within the device's limit (not under TRITON_INTERPRET: the CPU runs the Triton kernels)."""
    if not x2d.is_cuda or _interpreted():
        return False
    from . import topk_cuda

    if not topk_cuda.available(x2d.device):
        return False
    nsplit = 1 if p["DIRECT"] else cuda_split_plan(x2d.shape[0], x2d.shape[1], splits, wide)["NSPLIT"]
    return topk_cuda.fits(x2d.device.index, p, nsplit, sorted, wide)


def _launch_one_program(x2d, out2d, k, p, num_warps, sorted, path):
    R, T = x2d.shape
    if num_warps is None:  # few rows: one program must go fast; many: more programs per SM
        num_warps = 8 if R < 256 or p["NB"] * p["SB"] > 4096 or p["CAP"] > 8192 else 4
    scratch_rows = 1 if p["DIRECT"] else R
    cand_key = torch.empty((scratch_rows, p["CAP"]), dtype=torch.int32, device=x2d.device)
    cand_idx = torch.empty((scratch_rows, p["CAP"]), dtype=torch.int32, device=x2d.device)
    tie_idx = torch.empty((scratch_rows, p["KP"]), dtype=torch.int32, device=x2d.device)
    p = dict(p)
    r_sample = p.pop("R_SAMPLE")
    return _kernels()["topk"][(R,)](
        x2d, out2d, cand_key, cand_idx, tie_idx, out2d if path is None else path,
        T, k, r_sample,
        x2d.stride(0), x2d.stride(1), out2d.stride(0), out2d.stride(1),
        SORTED=bool(sorted), RECORD_PATH=path is not None, PREFIX_SKIP=False, num_warps=num_warps, **p,
    )


def rank_sort_wins(R: int, k: int) -> bool:
    """Whether the rank sort (k^2 comparisons a row, spread over programs) beats the bitonic sort in the
    select program: for few rows, where the bitonic network would run on a few SMs only (run 5, CUDA
    graphs, k = 2048: the rank sort adds 5 us at 1 x 32K, 12 us at 4 x 128K, 42 us at 16 x 32K; the
    bitonic sort ~37 us at 64 x 32K)."""
    return R * k <= 32 * 2048


def _launch_split(x2d, out2d, k, p, sp, sorted, path, rank_sort, tune):
    """Filter (one launch, or count + write when rows are split), then select: see the module doc."""
    R, T = x2d.shape
    dev = x2d.device
    cand_key = torch.empty((R, p["CAP"]), dtype=torch.int32, device=dev)
    cand_idx = torch.empty((R, p["CAP"]), dtype=torch.int32, device=dev)
    tie_idx = torch.empty((R, k), dtype=torch.int32, device=dev)
    counts = torch.empty((R, sp["NSPLIT"], 2), dtype=torch.int32, device=dev)
    thr = torch.empty((R,), dtype=torch.int32, device=dev)
    done = torch.empty((R,), dtype=torch.int32, device=dev)  # split rows: splits finished writing
    kern = _kernels()
    split = sp["NSPLIT"] > 1
    kern["filter"][(R, sp["NSPLIT"])](
        x2d, cand_key, cand_idx, tie_idx, counts, thr, done, T, k, p["R_SAMPLE"], sp["SEG"], sp["NSPLIT"],
        x2d.stride(0), x2d.stride(1), NB=p["NB"], SB=p["SB"], CHUNK=sp["CHUNK"], CAP=p["CAP"], WRITE=not split,
        num_warps=tune.get("filter_warps", 4))
    sel = torch.empty_like(out2d) if rank_sort else out2d
    select_warps = tune.get("select_warps", 8 if p["CAP"] >= 4096 or p["KP"] >= 2048 else 4)
    select = dict(CHUNK=p["CHUNK"], CAP=p["CAP"], KP=p["KP"], NSPLIT_P=sp["NSPLIT_P"],
                  SORTED=bool(sorted) and not rank_sort, RECORD_PATH=path is not None, num_warps=select_warps,
                  PREFIX_SKIP=bool(tune.get("prefix_skip", False)))
    path_arg = sel if path is None else path
    select_last = split and tune.get("select_in_write", R <= SELECT_IN_WRITE_ROWS)
    if split:  # the write runs with the select's warps only when it also selects
        h = kern["write"][(R, sp["NSPLIT"])](
            x2d, sel, cand_key, cand_idx, tie_idx, counts, thr, done, path_arg, T, k, sp["SEG"], sp["NSPLIT"],
            x2d.stride(0), x2d.stride(1), sel.stride(0), sel.stride(1),
            **dict(select, CHUNK=sp["CHUNK"], num_warps=select_warps if select_last else tune.get("filter_warps", 4)),
            SELECT_CHUNK=p["CHUNK"], SELECT_LAST=select_last, FENCE=not _interpreted())
    if not select_last:
        h = kern["select"][(R,)](
            x2d, sel, cand_key, cand_idx, tie_idx, counts, thr, path_arg, T, k, sp["NSPLIT"],
            x2d.stride(0), x2d.stride(1), sel.stride(0), sel.stride(1), **select)
    if rank_sort:
        rb = min(p["KP"], max(1, 32768 // p["KP"]))  # a [RB, KP] comparison tile a program
        h = kern["rank_sort"][(R, -(-k // rb))](
            x2d, sel, out2d, k, x2d.stride(0), x2d.stride(1), sel.stride(0), out2d.stride(0), out2d.stride(1),
            KP=p["KP"], RB=rb, num_warps=8)
    return h


def row_topk(logits: torch.Tensor, k: int, *, sorted: bool = False, num_warps: Optional[int] = None,
             algorithm: str = "auto") -> torch.Tensor:
    """int32 indices ``[..., k]`` of the k largest entries of each row (see module doc for order and ties);
    ``algorithm`` as in ``_launch`` (a caller that already asked ``default_algorithm`` passes its answer)."""
    if not supported(logits, k):
        raise ValueError(f"row_topk: needs a CUDA fp32 tensor with 1 <= k <= min(row length, {MAX_K}), "
                         f"rows of at most {MAX_ROW} (got {tuple(logits.shape)} {logits.dtype} k={k})")
    lead = logits.shape[:-1]
    T = logits.shape[-1]
    x2d = logits.reshape(-1, T)
    out = torch.empty((x2d.shape[0], k), dtype=torch.int32, device=logits.device)
    if x2d.shape[0]:
        with torch.cuda.device(logits.device):
            _launch(x2d, out, k, num_warps, sorted=sorted, algorithm=algorithm)
    return out.reshape(*lead, k)
