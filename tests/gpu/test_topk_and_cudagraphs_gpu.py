"""GPU checks of the top-k (``kernels.topk``: the CUDA C++ kernel and the Triton ones) and of CUDA-graph replay
(skipped without CUDA + Triton).

Top-k, both kernels: fresh random rows at prefill sizes (1024 x 32K, rows up to 300K keys) and decode batches (1-64),
k = 2048 and others, -inf padding, all-masked rows, repeated values, k = T; the selection, tie rule and
order are checked by ``tests/topk_cases.check`` against torch.topk, and random rows must take a fast
path (the exact fallback only where the sample misleads); every launch variant (split counts, bitonic and
rank sort, run 4's one-program kernel) at card sizes; the CUDA kernel on every one of its paths, on aligned, unaligned
and strided rows, its split rows' gather raced 300 times, its graph replay, and compute-sanitizer's memcheck and
racecheck over its small check cases (both block shapes, split rows, cluster rows on sm_90+). CUDA graphs: the split path and the fused logits +
top-k replay under ``torch.cuda.CUDAGraph`` on new inputs, and a DSA stack compiled with ``indexcache_backend`` and
Inductor's cudagraph trees (``triton.cudagraphs``, what mode="reduce-overhead" sets) replays correctly.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import topk_cases  # noqa: E402
from gpu_marks import needs_gpu, sanitizer_path  # noqa: E402

from fx_indexcache.fuse.kernels.lightning_indexer import indexer_logits, indexer_topk  # noqa: E402


pytestmark = needs_gpu


def _gen(seed=None):
    import os

    return torch.Generator(device="cuda").manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))


ALL_KINDS = ("randn", "masked", "ties", "allmasked", "wide")
TOPK_CASES = [  # (R, T, k, row kinds)
    (1024, 32768, 2048, ("randn",)), (64, 32768, 2048, ALL_KINDS), (1, 32768, 2048, ("randn", "masked")),
    (4, 262144, 2048, ("randn", "masked", "ties")), (2, 300000, 2048, ("randn",)), (3, 65536, 512, ALL_KINDS),
    (5, 8192, 2048, ("randn", "ties")), (7, 5000, 100, ALL_KINDS), (16, 32768, 64, ("randn", "ties")),
    (2, 32768, 8192, ("randn",)), (2, 4097, 4096, ("randn", "allmasked")), (3, 1, 1, ("randn",)),
]


@pytest.mark.parametrize("R,T,k,kind", [(R, T, k, kind) for R, T, k, kinds in TOPK_CASES for kind in kinds],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("sorted_", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("algorithm", ["cuda", "cuda_wide", "split"])
def test_row_topk_exact(R, T, k, kind, sorted_, algorithm):
    g = _gen()
    x = topk_cases.rows(kind, R, T, g, device="cuda")
    paths = topk_cases.check(x, k, sorted_, f"R={R} T={T} k={k} {kind} sorted={sorted_} {algorithm} "
                             f"seed={g.initial_seed()}", algorithm=algorithm)
    if kind == "randn":
        fallback = float((paths == 3).float().mean())
        assert fallback <= 0.02, f"{fallback:.1%} of random rows took the exact fallback"


@pytest.mark.parametrize("T", [65536, 131072, 262144, 300000])
@pytest.mark.parametrize("kind", ["randn", "masked", "ties"])
def test_the_default_for_one_long_row_is_the_rule_and_exact(T, kind):
    """One long unsorted row: the default runs the cluster rows on a card with clusters where ``cluster_wins``
    says, the split CUDA kernel where not, and the result is exact whichever runs."""
    from fx_indexcache.fuse.kernels import topk as tk
    from fx_indexcache.fuse.kernels import topk_cuda

    g = _gen()
    x = topk_cases.rows(kind, 1, T, g, device="cuda")
    clusters = topk_cuda.cluster_reason(x.device) is None
    assert (tk.default_algorithm(x, 2048, False) == "cuda_cluster") == (clusters and tk.cluster_wins(1, T, False))
    topk_cases.check(x, 2048, False, f"T={T} {kind} default seed={g.initial_seed()}", algorithm="auto")


LAUNCH_VARIANTS = [  # (R, T, k, launch options): every split count, both sorts, run 4's kernel, the tune options
    (1, 32768, 2048, dict(sort="rank")), (1, 32768, 2048, dict(sort="bitonic")), (64, 32768, 2048, dict(sort="rank")),
    (64, 32768, 2048, dict(splits=1)), (8, 131072, 2048, dict(splits=64, sort="rank")),
    (300, 65536, 2048, dict(splits=4)), (3, 32768, 1000, dict(splits=7)), (2, 65536, 4096, dict(sort="rank")),
    (32, 32768, 2048, dict(algorithm="one_program")), (64, 32768, 2048, dict(tune={"select_in_write": True})),
    (1, 131072, 2048, dict(tune={"select_in_write": False}, sort="bitonic")),
    (1024, 32768, 2048, dict(tune={"prefix_skip": True})), (64, 32768, 2048, dict(tune={"prefix_skip": True})),
    (1, 32768, 2048, dict(tune={"prefix_skip": True})),
]


@pytest.mark.parametrize("R,T,k,launch", LAUNCH_VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["randn", "ties", "masked"])
@pytest.mark.parametrize("sorted_", [False, True], ids=["unsorted", "sorted"])
def test_row_topk_launch_variants(R, T, k, launch, kind, sorted_):
    g = _gen()
    x = topk_cases.rows(kind, R, T, g, device="cuda")
    topk_cases.check(x, k, sorted_, f"R={R} T={T} k={k} {launch} {kind} sorted={sorted_} seed={g.initial_seed()}",
                     **{"algorithm": "split", **launch})  # Triton's launch options


@pytest.mark.parametrize("R,T", [(1, 32768), (16, 32768), (64, 131072)])
@pytest.mark.parametrize("launch", [dict(algorithm="split", tune={"select_in_write": True}), dict(algorithm="cuda"),
                                    dict(algorithm="cuda_cluster")],
                         ids=["triton_select_in_write", "cuda", "cuda_cluster"])
def test_last_split_is_race_free(R, T, launch):
    """Split rows, where the row's last split to finish selects (a count bumped after a release fence): Triton's
    select in the write (the default for one row, forced here for more) and the CUDA kernel's gather. Were the
    fence or the count wrong, a select would now and then read candidates another split had not yet written.
    Hundreds of back-to-back launches must give the same, exact indices."""
    from fx_indexcache.fuse.kernels import topk as tk

    _skip_without_clusters(launch["algorithm"])  # (a cluster's block 0 reads the others' candidates: the same race)
    assert tk.split_plan(R, T)["NSPLIT"] > 1  # not vacuous: the rows really are split
    x = torch.randn(R, T, device="cuda", generator=_gen())

    def run():
        out = torch.empty(R, 2048, dtype=torch.int32, device="cuda")
        tk._launch(x, out, 2048, **launch)
        return out

    first = run()
    assert torch.equal(torch.gather(x, 1, first.long()).sort(-1, descending=True).values,
                       torch.topk(x, 2048, dim=-1).values)
    outs = [run() for _ in range(300)]
    bad = [i for i, o in enumerate(outs) if not torch.equal(o, first)]
    assert not bad, f"{len(bad)} of 300 launches differ from the first (first at {bad[:5]})"


def test_cuda_topk_loads():
    """The CUDA top-k compiles (NVRTC) and loads here; else every other CUDA case would test the Triton one."""
    from fx_indexcache.fuse.kernels import topk_cuda

    assert topk_cuda.unavailable_reason(torch.device("cuda")) is None


#: (R, T, k, plan options, row kinds): plans that drive every path of the CUDA kernel (0 direct, 1 candidates,
#: 2 threshold ties, 3 the exact fallback: a 64-key sample ranks its 2nd key, about the top 3 % of 65536 keys,
#: which overflows a capacity of 1024; 4 and 5 the candidates where the filter counted them, the k-th key's bin
#: ranked or, with hundreds of equal scores in it ("quantized"), searched; "off_sample" rows put the k-th key above
#: the count's last bin: path 1), one block a row and split rows, on aligned, unaligned, strided and padded rows
#: (32766 keys: a wide block's last chunk ends inside a 16-byte load; its filter rereads kept keys by index).
#: The fallback's cases get as many rows as ``rows_that_overflow`` asks for.
CUDA_PATH_CASES = [
    (3, 700, 50, {}, ("randn", "ties", "allmasked", "zeros")),
    (300, 8192, 2048, {}, ("randn", "masked", "ties", "allmasked", "quantized", "off_sample")),
    (2, 65536, 40, dict(sample=64, cap=1024), ("randn",)),
    (300, 65536, 40, dict(sample=64, cap=1024), ("randn",)),
    (2, 65536, 2048, {}, ("randn", "masked", "ties", "allmasked", "wide", "negative", "quantized", "off_sample")),
    (2, 32766, 2048, {}, ("randn", "quantized", "off_sample")),
    (2, 32768, 40, dict(sample=8, cap=1024), ("randn",)),
    (1, 131072, 2048, dict(splits=128), ("randn", "ties")),
    (4, 40000, 1000, dict(splits=5), ("randn", "masked", "ties")),
]
#: The candidates' paths (above): 1, or 4 / 5 where the filter counted them.
CANDIDATE_PATHS = {1, 4, 5}


def rows_that_overflow(T: int, k: int, opts: dict, wide: bool, odds: float = 1e-9) -> int:
    """Random rows enough that none of them taking the exact fallback (path 3, which the test asks to see) has
    odds under ``odds``. A row of iid keys avoids the fallback when at least ``R_SAMPLE`` of the sample's keys lie
    among its top ``cap`` keys (the threshold then keeps at most ``cap`` candidates): a binomial tail, the same for
    every row and both sorted modes (they see the same rows). At 65536 keys a 64-key sample against a capacity of
    1024 avoids it in 1 row of 4, so two rows missed it 7 % of the time."""
    from fx_indexcache.fuse.kernels import topk as tk
    from fx_indexcache.fuse.kernels import topk_cuda

    plan = tk.plan(T, k, **{n: v for n, v in opts.items() if n in ("cap", "sample")})
    n, r = plan["NB"] * plan["SB"], plan["R_SAMPLE"]
    within = max(plan["CAP"], topk_cuda.min_cap(wide)) / T
    avoids = 1.0 - sum(math.comb(n, i) * within ** i * (1.0 - within) ** (n - i) for i in range(r))
    return 1 if avoids <= 0.0 else math.ceil(math.log(odds) / math.log(avoids))


#: The wide kernel's: its capacity is at least 4096 (a step of its select), so the fallback needs an 8-key sample;
#: split rows as asked for.
WIDE_PATH_CASES = [(R, T, k, dict(sample=8, cap=1024), kinds) if "sample" in o else (R, T, k, o, kinds)
                   for R, T, k, o, kinds in CUDA_PATH_CASES]
#: Cluster rows (sm_90+): the wide cases, the row cut in the cluster's eight blocks whatever ``splits`` says.
CLUSTER_PATH_CASES = [(R, T, k, {n: v for n, v in o.items() if n != "splits"}, kinds) for R, T, k, o, kinds in WIDE_PATH_CASES]
PATH_CASES = [(alg, max(R, rows_that_overflow(T, k, o, alg != "cuda")) if "sample" in o else R, T, k, o, kinds)
              for alg, cases in (("cuda", CUDA_PATH_CASES), ("cuda_wide", WIDE_PATH_CASES),
                                 ("cuda_cluster", CLUSTER_PATH_CASES)) for R, T, k, o, kinds in cases]


def _skip_without_clusters(algorithm: str) -> None:
    from fx_indexcache.fuse.kernels import topk_cuda

    why = topk_cuda.cluster_reason(torch.device("cuda")) if algorithm == "cuda_cluster" else None
    if why is not None:
        pytest.skip(why)


def _padded(rows: torch.Tensor, T: int) -> torch.Tensor:
    """``rows`` in a buffer whose rows are a multiple of four keys longer than T (aligned 16-byte loads; NaN in the
    padding, which no launch may read)."""
    buf = torch.full((rows.shape[0], -(-T // 4) * 4 + 4), float("nan"), device=rows.device)
    buf[:, :T] = rows
    return buf[:, :T]


@pytest.mark.parametrize("algorithm,R,T,k,opts,kinds", PATH_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["contiguous", "unaligned", "strided", "padded"])
def test_cuda_topk_every_path_and_layout(algorithm, R, T, k, opts, kinds, layout):
    _skip_without_clusters(algorithm)
    g = _gen()
    seen = set()
    for kind in kinds:
        r = topk_cases.rows(kind, R, T, g, device="cuda").contiguous()
        x = {"contiguous": r, "unaligned": torch.cat([r[:, :1], r], 1)[:, 1:], "strided": r.t().contiguous().t(),
             "padded": _padded(r, T)}[layout]
        for sorted_ in (False, True):
            where = f"R={R} T={T} k={k} {opts} {kind} {layout} sorted={sorted_} seed={g.initial_seed()}"
            seen |= set(topk_cases.check(x, k, sorted_, where, algorithm=algorithm, **opts).tolist())
    want = {0} if T <= 1024 else ({3} if "sample" in opts else CANDIDATE_PATHS)
    assert want & seen, f"paths {sorted(seen)}, expected one of {sorted(want)} among them"


@pytest.mark.parametrize("algorithm", ["cuda", "cuda_wide", "cuda_cluster"])
def test_cuda_topk_takes_every_path(algorithm):
    """Over the cases above, each path ran at least once (the test is not vacuous): the four of every launch, and
    the counted candidates' two (4, 5) where one block filters a row (not a cluster's)."""
    from fx_indexcache.fuse.kernels import topk as tk

    _skip_without_clusters(algorithm)
    g = _gen()
    seen = set()
    for alg, R, T, k, opts, kinds in PATH_CASES:
        if alg != algorithm:
            continue
        for kind in kinds:
            x = topk_cases.rows(kind, R, T, g, device="cuda")
            out = torch.empty(R, k, dtype=torch.int32, device="cuda")
            path = torch.full((R,), -1, dtype=torch.int32, device="cuda")
            tk._launch(x, out, k, path=path, algorithm=algorithm, **opts)
            seen |= set(path.tolist())
    assert seen == ({0, 1, 2, 3} if algorithm == "cuda_cluster" else {0, 1, 2, 3, 4, 5}), sorted(seen)


#: Binned rows (the threshold from the rows' counts, ``topk_cuda.row_bins``): one, several, a length no multiple of 4
#: in a padded buffer, the longest the wide capacity keeps.
BINNED_CASES = [(1, 8192), (4, 32768), (2, 32766), (64, 32768), (1, 65536)]


@pytest.mark.parametrize("R,T", BINNED_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["randn", "masked", "ties", "allmasked", "quantized", "negative", "zeros"])
def test_binned_rows_are_exact_whatever_their_counts(R, T, kind):
    """The wide block given its rows' binned counts takes its threshold from them (``topk_wide_vec_binned``, the
    profiler's kernel names), exact sorted and not; and exact with counts that are not the rows' (another row's,
    all zero: the sample then steers), since the counts only steer the filter."""
    from fx_indexcache.fuse.kernels import topk as tk
    from fx_indexcache.fuse.kernels import topk_cuda

    g = _gen()
    r = topk_cases.rows(kind, R, T, g, device="cuda").contiguous()
    x = _padded(r, T) if T % 4 else r
    own = topk_cuda.row_bins(x)
    for name, bins in (("own", own), ("another row's", own.roll(1, 0) if R > 1 else own.flip(1).contiguous()),
                       ("zero", torch.zeros_like(own))):
        for sorted_ in (False, True):
            where = f"binned ({name} counts) R={R} T={T} {kind} sorted={sorted_} seed={g.initial_seed()}"
            topk_cases.check(x, 2048, sorted_, where, algorithm="cuda_wide", bins=bins)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        tk._launch(x, torch.empty(R, 2048, dtype=torch.int32, device="cuda"), 2048, algorithm="cuda_wide", bins=own)
        torch.cuda.synchronize()
    assert any("topk_wide_vec_binned" in e.name for e in prof.events()), sorted({e.name for e in prof.events()})


def test_binned_rows_replay_in_a_cuda_graph():
    """The binned launch captured once and replayed on new rows and their new counts gives a fresh launch's top-k."""
    from fx_indexcache.fuse.kernels import topk as tk
    from fx_indexcache.fuse.kernels import topk_cuda

    g = _gen()
    x = torch.randn(2, 32768, device="cuda", generator=g)
    bins = topk_cuda.row_bins(x)
    out = torch.empty(2, 2048, dtype=torch.int32, device="cuda")
    tk._launch(x, out, 2048, algorithm="cuda_wide", bins=bins)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tk._launch(x, out, 2048, algorithm="cuda_wide", bins=bins)
    for _ in range(2):
        x.copy_(torch.randn(2, 32768, device="cuda", generator=g))
        bins.copy_(topk_cuda.row_bins(x))
        graph.replay()
        want = torch.empty_like(out)
        tk._launch(x, want, 2048, algorithm="cuda_wide")
        assert torch.equal(out, want)


@pytest.mark.parametrize("B,S,T,config", [(1, 1, 32768, ("key_rows", 1, 128, 4, 2)),
                                           (4, 1, 32768, ("key_rows", 1, 64, 4, 2, 1, 4)),
                                           (1, 64, 8192, ("key_rows", 16, 64, 4, 2, 2))], ids=str)
def test_binned_counts_from_the_logits_kernel_are_the_rows(B, S, T, config):
    """The key-rows logits kernel counting its keys (``indexer_logits(bins=...)``, bf16 on the card): the same logits
    as without counts, counts equal to ``row_bins`` of them but in the -inf bin (uncomputed -inf keys are not
    counted), and the binned top-k over them exact with path 4 or 5 (the counts found the k-th key's bin)."""
    from fx_indexcache.fuse.kernels import lightning_indexer as li
    from fx_indexcache.fuse.kernels import topk_cuda

    g = _gen()
    H, D = 64, 128
    q = torch.randn(B, S, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, T, D, device="cuda", generator=g).bfloat16()
    w = (torch.randn(B, S, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    cfg = li.LogitsConfig(*config)
    plain = li.indexer_logits(q, k, w, scale=D**-0.5, config=cfg)
    bins = torch.zeros(B * S, topk_cuda.ROW_BINS, dtype=torch.int32, device="cuda")
    x = li.indexer_logits(q, k, w, scale=D**-0.5, config=cfg, bins=bins)
    assert torch.equal(x, plain)
    want = topk_cuda.row_bins(x.view(B * S, T))
    ninf = int(topk_cuda.row_bins(torch.tensor([[float("-inf")]], device="cuda")).argmax())
    other = torch.arange(topk_cuda.ROW_BINS, device="cuda") != ninf
    assert torch.equal(bins[:, other], want[:, other])
    assert bool((bins[:, ninf] <= want[:, ninf]).all())
    if S == 1:
        paths = topk_cases.check(x.view(B * S, T), 2048, False, f"counted B={B} T={T} seed={g.initial_seed()}",
                                 algorithm="cuda_wide", bins=bins)
        assert set(paths.tolist()) <= {4, 5}, paths


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_cuda_topk_under_compute_sanitizer(tool, tmp_path):
    """Every small check case (both block shapes, one block a row and split rows, every path) under the tool: no
    read or write out of bounds (the wide filter's rereads of its kept keys included), no shared-memory race (the
    kernel's barriers between its histogram passes)."""
    sanitizer = sanitizer_path()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not installed")
    root = Path(__file__).resolve().parent.parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests"), str(root / "benchmarks")]))
    done = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable,
                           str(root / "benchmarks" / "bench_topk_cuda.py"), "--sanitize", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=1500)
    out = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, out
    assert "0 failing checks" in out, out
    assert "ERROR SUMMARY: 0 errors" in out or "RACECHECK SUMMARY: 0 hazards" in out, out


@pytest.mark.parametrize("R,T,sorted_,algorithm,splits", [
    (4, 32768, True, "cuda", None), (1, 131072, False, "cuda", None), (300, 32768, True, "cuda", None),
    (1, 32768, False, "cuda_wide", None), (16, 65536, True, "cuda_wide", None), (1, 32768, False, "cuda_wide", 8),
    (2, 65536, True, "cuda_wide", 4), (1, 32768, False, "cuda_cluster", None), (4, 131072, True, "cuda_cluster", None),
    (1, 131072, False, "auto", None)])
def test_cuda_topk_replays_in_a_cuda_graph(R, T, sorted_, algorithm, splits):
    from fx_indexcache.fuse.kernels import topk as tk

    _skip_without_clusters(algorithm)
    g = _gen()
    x = torch.randn(R, T, device="cuda", generator=g)
    out = torch.empty(R, 2048, dtype=torch.int32, device="cuda")
    tk._launch(x, out, 2048, sorted=sorted_, algorithm=algorithm, splits=splits)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tk._launch(x, out, 2048, sorted=sorted_, algorithm=algorithm, splits=splits)
    for _ in range(2):
        x.copy_(torch.randn(R, T, device="cuda", generator=g))
        graph.replay()
        torch.cuda.synchronize()
        topk_cases.check(x, 2048, sorted_, "reference launch", algorithm="split")  # the inputs are fine
        want = torch.empty_like(out)
        tk._launch(x, want, 2048, sorted=sorted_, algorithm=algorithm, splits=splits)
        assert torch.equal(out, want)
        assert torch.equal(torch.gather(x, 1, out.long()).sort(-1, descending=True).values,
                           torch.topk(x, 2048, dim=-1).values)


def test_row_topk_split_replays_in_a_cuda_graph():
    """The split path (count, write and select, rank sort: three launches, fixed-size scratch) under capture."""
    from fx_indexcache.fuse.kernels import topk as tk

    g = _gen()
    x = torch.randn(4, 32768, device="cuda", generator=g)
    assert tk.split_plan(4, 32768)["NSPLIT"] > 1 and tk.rank_sort_wins(4, 2048)
    out = torch.empty(4, 2048, dtype=torch.int32, device="cuda")
    tk._launch(x, out, 2048, sorted=True, algorithm="split")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tk._launch(x, out, 2048, sorted=True, algorithm="split")
    for _ in range(2):
        x.copy_(torch.randn(4, 32768, device="cuda", generator=g))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(torch.gather(x, 1, out.long()), torch.topk(x, 2048, dim=-1).values)


def test_indexer_topk_k_above_T_and_invalid_index():
    g = _gen()
    x = torch.randn(3, 40, 700, device="cuda", generator=g)
    x[..., 500:] = float("-inf")
    idx = indexer_topk(x, 2048, invalid_index=-1)
    assert idx.shape == (3, 40, 700)
    assert torch.equal((idx == -1).sum(-1), torch.full((3, 40), 200, device="cuda"))
    assert bool((idx[..., :500] >= 0).all())  # sorted: every visible key before the masked ones


def _stack_inputs(B=2, S=64, T=4096, H=64, D=128, seed=0):
    g = _gen(seed)
    q = torch.randn(B, S, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, T, D, device="cuda", generator=g).bfloat16()
    w = torch.randn(B, S, H, device="cuda", generator=g) * H**-0.5
    return q, k, w


def test_fused_logits_and_topk_replay_in_a_cuda_graph():
    q, k, w = _stack_inputs()
    static = [t.clone() for t in (q, k, w)]

    def step():
        logits = indexer_logits(*static, causal=True, scale=0.1)
        return logits, indexer_topk(logits, 512, sorted=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_logits, out_idx = step()
    for seed in (1, 2):
        for dst, src in zip(static, _stack_inputs(seed=seed)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want_logits = indexer_logits(*static, causal=True, scale=0.1)
        assert torch.equal(out_logits, want_logits)
        assert torch.equal(out_idx, indexer_topk(want_logits, 512, sorted=True))
        assert torch.equal(torch.gather(want_logits, -1, out_idx.long()), torch.topk(want_logits, 512, dim=-1).values)


@pytest.mark.parametrize("B,T", [(1, 131072), (8, 32768)], ids=str)
def test_programmatic_launches_read_their_producers_final_writes(B, T):
    """With programmatic dependent launch (on by default from sm_90; ``programmatic_launch``) the logits kernel lets
    the top-k be scheduled as soon as its own programs start, and the logits kernel itself may start under the
    kernel before it. Each must still read its producer's final writes: the logits buffer is first filled with a
    ramp whose top-k (its first keys) no real row has, by a fill kernel, then the logits kernel overwrites it and
    the CUDA top-k selects; eagerly and replayed in a CUDA graph, twenty times each, the selection is the top-k of
    the final logits. A top-k that read before the logits' writes landed would return ramp indices."""
    from fx_indexcache.fuse.kernels import lightning_indexer as li
    from fx_indexcache.fuse.kernels import programmatic_launch
    from fx_indexcache.fuse.kernels import topk as tk

    why = programmatic_launch.reason_not(torch.device("cuda"))
    if why is not None:
        pytest.skip(why)
    g = _gen()
    H, D, K = 64, 128, 2048
    q = torch.randn(B, 1, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, T, D, device="cuda", generator=g).bfloat16()
    w = (torch.randn(B, 1, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    x = torch.empty(B, 1, T, device="cuda")
    ramp = torch.arange(T, 0, -1, device="cuda", dtype=torch.float32).expand(B, 1, T) * 1e30
    out = torch.empty(B, K, dtype=torch.int32, device="cuda")

    def step():
        x.copy_(ramp)
        li.indexer_logits(q, k, w, scale=D**-0.5, out=x)
        tk._launch(x.view(B, T), out, K, algorithm="cuda_wide")

    def check(what):
        torch.cuda.synchronize()
        want = torch.topk(x.view(B, T), K, dim=-1).values
        got = torch.gather(x.view(B, T), 1, out.long()).sort(-1, descending=True).values
        assert torch.equal(got, want), what
        assert float(x.max()) < 1e29, what  # the ramp was overwritten

    for i in range(20):
        step()
        check(f"eager {i}")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i in range(20):
        q.copy_(torch.randn(B, 1, H, D, device="cuda", generator=g))
        graph.replay()
        check(f"replay {i}")


def test_unbatched_stack_under_inductor_cudagraph_trees():
    """indexcache_backend + cudagraph trees: fused F layers replay the same indices as eager."""
    import fx_indexcache
    from fx_indexcache import indexcache_backend
    from indexer_stack import UnbatchedDSAStack

    torch.manual_seed(0)
    model = UnbatchedDSAStack(num_layers=4, hidden=256, heads=16, head_dim=64, topk=128).cuda().bfloat16()
    past_k, past_v = model.empty_cache(64, "cuda", torch.bfloat16)
    T = 64 + 192
    fx_indexcache.clear_reports()
    compiled = torch.compile(model, backend=indexcache_backend, dynamic=False,
                             options={"index_topk_pattern": "FSFS", "triton.cudagraphs": True,
                                      "fx_graph_cache": False})
    for seed in (1, 2, 3):  # the 2nd+ calls replay the recorded graph
        x = torch.randn(192, 256, device="cuda", generator=_gen(seed)).bfloat16()
        with torch.no_grad():
            got = [t.clone() for t in compiled(x, past_k, past_v)[1]]
            want = model(x, past_k, past_v, pattern="FSFS")[1]
        for layer, (a, b) in enumerate(zip(got, want)):
            hit = torch.zeros(b.shape[0], T, device="cuda").scatter_(1, b.long(), 1.0)
            overlap = torch.gather(hit, 1, a.long()).mean().item()
            # layer 0 sees identical inputs; later layers inherit bf16 differences of the layers below
            assert overlap > (0.98 if layer < 2 else 0.9), (layer, overlap)
    report = fx_indexcache.reports()[-1]
    assert report.indexers_removed == 2
    assert report.indexers_fused == 2, report.fusions
