"""The top-k's dispatch tables (``kernels.topk``) against the H200 measurements they come from.

``faster_than_torch`` may send a shape to the Triton kernels only where run 5 measured them faster than
torch.topk (eagerly: do_bench of the top-k alone; under CUDA-graph capture: decode logits + top-k
replayed in a graph), and to the CUDA kernel only where run 8 measured it faster, so the default never
gets slower than torch.topk at a measured shape; the CUDA kernel is the default (``CUDA_MIN_ROWS``) only
where it beat the Triton kernels, and where it is not, the Triton kernels were never much slower; and the
split plan's one-program-a-row choice must be the fastest split count the sweep measured.
"""

import json
from pathlib import Path

import pytest

from fx_indexcache.fuse.kernels import topk as tk

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "indexer_kernel_topk_run2.json"
RUN8 = RUN.with_name("topk_cuda_run8.json")


@pytest.fixture(scope="module")
def run5():
    return json.loads(RUN.read_text())


def test_eager_dispatch_only_where_the_kernel_measured_faster(run5):
    chosen = 0
    for r in run5["topk"]:
        for mode, sorted_ in (("sorted", True), ("unsorted", False)):
            if tk.faster_than_torch(r["R"], r["T"], r["k"], sorted_):
                chosen += 1
                assert r[f"triton_{mode}_ms"] < r[f"torch_{mode}_ms"], (r["R"], r["T"], r["k"], mode)
                assert r["exact_sorted"] and r["exact_unsorted"]
    assert chosen >= 4  # not vacuous: the measured wins are taken


def test_graph_dispatch_only_where_the_replay_measured_faster(run5):
    chosen = 0
    for r in run5["decode"]:
        for mode, sorted_ in (("sorted", True), ("unsorted", False)):
            torch_key = "fused_torch_topk_graph_ms" if sorted_ else "fused_torch_topk_unsorted_graph_ms"
            if tk.faster_than_torch(r["B"], r["T"], 2048, sorted_, in_cuda_graph=True):
                chosen += 1
                got = r["fused_sorted_graph_ms" if sorted_ else "fused_unsorted_graph_ms"]
                assert got < r[torch_key], (r["B"], r["T"], mode)
    assert chosen == 2 * len(run5["decode"])  # every decode shape measured was a win


def test_split_plan_takes_the_fastest_measured_split_count_for_many_rows(run5):
    by_shape = {}
    for r in run5["splits"]:
        by_shape.setdefault((r["R"], r["T"]), []).append(r)
    checked = 0
    for (R, T), rows in by_shape.items():
        if R >= tk.ONE_SPLIT_ROWS:
            best = min(rows, key=lambda r: r["ms"])
            assert tk.split_plan(R, T)["NSPLIT"] == best["splits"] == 1, (R, T)
            checked += 1
    assert checked >= 2


def test_split_plan_covers_each_row_once():
    for R, T, splits in [(1, 32768, None), (16, 32768, None), (4, 300000, None), (3, 1000, 3), (2, 4097, 7),
                         (1024, 131072, None), (1, 1, None)]:
        p = tk.split_plan(R, T, splits)
        assert p["SEG"] % p["CHUNK"] == 0 and p["NSPLIT"] * p["SEG"] >= T > (p["NSPLIT"] - 1) * p["SEG"]
        assert p["NSPLIT_P"] >= p["NSPLIT"] and p["CHUNK"] <= 32768  # a chunk's counts share one int32


@pytest.fixture(scope="module")
def run8():
    return json.loads(RUN8.read_text())["results"]


def test_cuda_dispatch_only_where_the_kernel_measured_faster(run8):
    chosen = 0
    for r in run8:
        for mode, sorted_ in (("_sorted", True), ("", False)):
            if f"torch{mode}" in r and tk.faster_than_torch(r["R"], r["T"], 2048, sorted_, algorithm="cuda"):
                chosen += 1
                assert r[f"cuda{mode}"] < r[f"torch{mode}"], (r["R"], r["T"], mode)
    assert chosen >= 8  # not vacuous: every prefill shape, both orders


def test_cuda_is_the_default_only_where_it_beat_the_triton_kernels(run8):
    seen = {True: 0, False: 0}
    for r in run8:
        cuda_default = r["R"] >= tk.CUDA_MIN_ROWS
        seen[cuda_default] += 1
        if cuda_default:
            assert r["cuda"] < r["split"], (r["R"], r["T"])
        else:  # left on Triton: never more than 6 % slower there than the CUDA kernel
            assert r["split"] < 1.06 * r["cuda"], (r["R"], r["T"])
    assert seen[True] >= 4 and seen[False] >= 4


@pytest.fixture(scope="module")
def run9():
    return json.loads(RUN8.with_name("topk_cuda_run9.json").read_text())["topk_graph_us"]


@pytest.fixture(scope="module")
def run10():
    """Run 10's CUDA-graph replays of few rows (unsorted; ms there, us here, as in run 9)."""
    rows = json.loads(RUN8.with_name("topk_cuda_run10.json").read_text())["results"]
    return [{key: (1e3 * v if isinstance(v, float) else v) for key, v in r.items()} for r in rows if r["graph"]]


def _check_preferred_is_fastest(rows, modes) -> dict:
    """For fewer than CUDA_MIN_ROWS rows, ``preferred_algorithm`` must be (within 2 %) the fastest of our three
    kernels measured at each shape; returns how often each was chosen."""
    chosen = {"cuda": 0, "cuda_wide": 0, "split": 0}
    for r in rows:
        for mode, sorted_ in modes:
            times = {a: r[a + mode] for a in chosen if a + mode in r}
            if r["R"] >= tk.CUDA_MIN_ROWS or len(times) < len(chosen):
                continue
            pick = tk.preferred_algorithm(r["R"], r["T"], sorted_, clusters=False)  # (runs without cluster rows)
            assert times[pick] <= 1.02 * min(times.values()), (r["R"], r["T"], mode, pick, times)
            chosen[pick] += 1
    return chosen


def test_the_preferred_kernel_for_few_rows_is_the_fastest_measured(run9, run10):
    """Runs 9 and 10 (H200): each of the wide block, the split CUDA kernel and the Triton split kernels is the
    default somewhere, and only where it measured fastest."""
    seen = _check_preferred_is_fastest(run9, (("", False), ("_sorted", True)))
    assert seen["cuda_wide"] >= 12 and seen["split"] >= 8 and seen["cuda"] >= 3, seen
    seen = _check_preferred_is_fastest(run10, (("", False),))
    assert seen["cuda_wide"] >= 8 and seen["split"] >= 1 and seen["cuda"] >= 3, seen


def test_one_long_row_takes_the_split_cuda_kernel_only_in_graphs_where_it_beat_torch(run9, run10):
    chosen = 0
    for r in run9 + run10:
        if tk.split_cuda_wins(r["R"], r["T"], False):
            assert tk.faster_than_torch(r["R"], r["T"], 2048, False, in_cuda_graph=True, algorithm="cuda")
            assert not tk.faster_than_torch(r["R"], r["T"], 2048, False, algorithm="cuda")  # eager: unmeasured
            assert r["cuda"] < r["torch"], (r["R"], r["T"])
            chosen += 1
    assert chosen >= 6


def test_wide_dispatch_only_where_it_measured_faster_than_torch(run9):
    """Where the wide kernel is the default, ``faster_than_torch`` keeps it only where it beat torch.topk (sorted:
    against torch's unsorted time, which the sorted call does not undercut)."""
    chosen = 0
    for r in run9:
        for mode, sorted_ in (("_sorted", True), ("", False)):
            if tk.wide_wins(r["R"], r["T"], sorted_) and tk.faster_than_torch(r["R"], r["T"], 2048, sorted_, in_cuda_graph=True, algorithm="cuda_wide"):
                chosen += 1
                assert r[f"cuda_wide{mode}"] < r["torch"], (r["R"], r["T"], mode)
                assert r["cuda_wide_eager"] < r["torch_eager"] or sorted_, (r["R"], r["T"])
    assert chosen >= 12


@pytest.fixture(scope="module")
def cluster_long_rows():
    """The H100's replay of the cluster rows beside the default before them, top-k alone, us by (R, T)."""
    data = json.loads(RUN8.with_name("topk_cluster_long_rows_h28_h100_fc66ec8.json").read_text())
    return {name: {(r["R"], r["T"]): 1e3 * r["topk_graph_ms"] for r in data[name]["results"]}
            for name in ("auto", "cuda_cluster")}


def test_the_cluster_rows_are_the_default_only_where_they_measured_faster(cluster_long_rows):
    """One long unsorted row takes the cluster rows (on a card with clusters), and only there did they win: at every
    measured shape, cluster_wins agrees with the replay, and the rule takes at least three shapes."""
    before, cluster = cluster_long_rows["auto"], cluster_long_rows["cuda_cluster"]
    taken = 0
    for (R, T), us in cluster.items():
        wins = tk.cluster_wins(R, T, False)
        assert wins == (us < before[(R, T)]), (R, T, us, before[(R, T)])
        assert (tk.preferred_algorithm(R, T, False) == "cuda_cluster") == wins
        assert tk.preferred_algorithm(R, T, False, clusters=False) != "cuda_cluster"
        taken += wins
    assert taken >= 3
    assert not tk.cluster_wins(1, 131072, True)  # sorted: the bitonic sort on one SM (unmeasured with clusters)
    assert tk.faster_than_torch(1, 131072, 2048, False, in_cuda_graph=True, algorithm="cuda_cluster")
    assert not tk.faster_than_torch(1, 131072, 2048, False, algorithm="cuda_cluster")  # eager: unmeasured


def test_cluster_rows_fall_back_off_cuda_and_say_why_when_asked_for():
    """Off CUDA the default for one long row is the Triton kernels (no cluster, no CUDA top-k); asked for by name,
    the cluster rows say why they cannot run."""
    import torch

    assert "cuda_cluster" in tk.ALGORITHMS
    long_row = torch.randn(1, 65536)
    assert tk.preferred_algorithm(1, 65536, False) == "cuda_cluster"
    assert tk.default_algorithm(long_row, 2048, False) == "split"
    x = torch.randn(2, 5000)
    with pytest.raises(ValueError, match="cuda_cluster.*not on a CUDA device"):
        tk._launch(x, torch.empty(2, 64, dtype=torch.int32), 64, algorithm="cuda_cluster")


class _RowsOnACard:
    """What the dispatch reads of a CUDA tensor (its shape and device), without one."""

    is_cuda = True

    def __init__(self, R: int, T: int):
        import torch

        self.shape = (R, T)
        self.device = torch.device("cuda", 0)


@pytest.mark.parametrize("cluster_why, cluster_fits, want", [
    (None, True, "cuda_cluster"),
    ("compute capability (8, 0) has no thread-block clusters (9.0+)", True, "cuda"),
    (None, False, "cuda"),
])
def test_one_long_row_falls_back_from_the_cluster_rows_to_the_split_cuda_kernel(monkeypatch, cluster_why,
                                                                                cluster_fits, want):
    """On a card without clusters, or where the cluster launch's shared memory does not fit, one long row takes
    the split CUDA kernel (the default before the cluster rows), not the Triton kernels."""
    from fx_indexcache.fuse.kernels import topk_cuda

    monkeypatch.setattr(tk, "_interpreted", lambda: False)
    monkeypatch.setattr(topk_cuda, "available", lambda device: True)
    monkeypatch.setattr(topk_cuda, "cluster_reason", lambda device: cluster_why)
    monkeypatch.setattr(topk_cuda, "fits", lambda device, p, nsplit, sorted, wide=False, cluster=False:
                        cluster_fits if cluster else True)
    assert tk.default_algorithm(_RowsOnACard(1, 131072), 2048, False) == want
    assert tk.default_algorithm(_RowsOnACard(1, 32768), 2048, False) == "cuda_wide"  # not a long row
    assert tk.default_algorithm(_RowsOnACard(1, 131072), 2048, True) != "cuda_cluster"  # sorted
