"""Checks of ``kernels.topk`` shared by the CPU interpreter test and the GPU tests.

``check(x, k, sorted)`` runs the kernel on fresh rows and asserts: every index in range and distinct;
the selected scores equal torch.topk's (as multisets, so the set differs at most at exact ties); the
tie rule (the lowest-indexed keys equal to the k-th score); the order (unsorted: the keys above the
k-th score in index order, then the ties; sorted: descending, equal scores by ascending index).
Run as a script under ``TRITON_INTERPRET=1`` it checks every path of the kernel on small rows on the CPU.
"""

from __future__ import annotations

import os
import sys

import torch

from fx_indexcache.fuse.kernels import topk as tk

#: (name, rows, T, k, launch options, row kinds, expected paths on randn rows) -- small capacities, so
#: that short rows take every path of both algorithms (split rows: several programs a row count, then write,
#: then a select launch, or for one row the last split to finish selects; sorted output by the select's bitonic
#: sort or by the rank sort: "auto" picks rank for these few rows).
#: In the fallback cases the sampled threshold lies a median 166 keys down the row, but within the capacity of 64
#: for 0.25 % of randn rows (20000 simulated), and such a row rightly takes the candidates (path 1; its indices are
#: checked like any other's): with 12 such rows a run, 3 % of runs. That the fallback (3) runs is asserted over all
#: cases in ``main``.
FALLBACK_PATHS = {1, 3}

CASES = [
    ("direct", 3, 50, 7, {}, ("randn", "zeros", "ties"), {0}),
    ("candidates", 2, 1000, 16, dict(cap=256, sample=128), ("randn", "masked", "ties", "allmasked"), {1}),
    ("candidates_chunk_256", 2, 1000, 16, dict(cap=256, sample=128, tune={"chunk": 256}),
     ("randn", "masked", "ties"), {1}),
    ("split_candidates", 2, 1000, 16, dict(cap=256, sample=128, splits=3),
     ("randn", "masked", "ties", "allmasked", "zeros"), {1}),
    ("split_select_in_write", 2, 1000, 16, dict(cap=256, sample=128, splits=3, tune={"select_in_write": True}),
     ("randn", "ties", "allmasked"), {1}),
    ("prefix_skip", 2, 1000, 16, dict(cap=256, sample=128, tune={"prefix_skip": True}),
     ("randn", "masked", "ties", "zeros", "wide", "shifted"), {1}),
    ("split_prefix_skip", 2, 1000, 16, dict(cap=256, sample=128, splits=3, tune={"prefix_skip": True}),
     ("randn", "ties", "negative", "shifted"), {1}),
    ("split_one_row", 1, 1000, 16, dict(cap=256, sample=128, splits=4), ("randn", "masked", "ties"), {1}),
    ("split_bitonic_sort", 2, 1000, 16, dict(cap=256, sample=128, splits=2, sort="bitonic"),
     ("randn", "ties", "allmasked"), {1}),
    ("split_rank_sort_large_k", 3, 700, 600, dict(cap=256, sample=128, splits=3, sort="rank"),
     ("randn", "ties", "masked", "wide"), None),
    ("split_fallback", 2, 1000, 40, dict(cap=64, sample=64, splits=4), ("randn",), FALLBACK_PATHS),
    ("fallback_capacity", 2, 1000, 40, dict(cap=64, sample=64), ("randn",), FALLBACK_PATHS),
    ("k_equals_T", 2, 300, 300, dict(cap=64, sample=64, splits=2), ("allmasked", "wide"), None),
    ("one_program", 2, 1000, 16, dict(cap=256, sample=128, algorithm="one_program"),
     ("randn", "ties", "allmasked"), {1}),
    ("one_program_fallback", 2, 1000, 40, dict(cap=64, sample=64, algorithm="one_program"), ("randn",), FALLBACK_PATHS),
]


def rows(kind: str, R: int, T: int, g: torch.Generator, device="cpu") -> torch.Tensor:
    x = torch.randn(R, T, generator=g, device=device)
    if kind == "ties":
        x = torch.randint(-4, 4, (R, T), generator=g, device=device).float()
    elif kind == "masked":
        x[:, T // 3:] = float("-inf")
    elif kind == "allmasked":
        x[:] = float("-inf")
    elif kind == "zeros":
        x[:, ::3] = 0.0
        x[:, 1::3] = -0.0
    elif kind == "negative":  # every key below zero: the sign bit and the flipped magnitudes
        x = -x.abs() - 1.0
    elif kind == "shifted":  # keys crowded in one binade: most high bits shared by the candidates
        x = 1000.0 + x
    elif kind == "wide":
        x = x * torch.exp2(torch.randint(-60, 60, (R, T), generator=g, device=device).float())
    elif kind == "quantized":  # scores on a grid of 1/8: hundreds of keys share the k-th score's bin at T >= 8K
        x = torch.round(x * 8.0) / 8.0
    elif kind == "off_sample":  # the top 2100 keys where the sample of a k = 2048 plan does not look
        x = _off_sample(x, g)
    return x


def _off_sample(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rows whose sampled blocks (``topk.plan(T, 2048)``'s) hold normal scores, 2100 other keys far above them and
    the rest far below: the sample's largest key lies below the k-th, so a threshold from it keeps the top keys as
    candidates while a histogram bounded by the sample's largest key piles them into its last bin."""
    R, T = x.shape
    p = tk.plan(T, 2048)
    sampled = torch.zeros(T, dtype=torch.bool)
    for b in range(p["NB"]):
        start = b * T // p["NB"]
        sampled[start:start + p["SB"]] = True
    off = (~sampled).nonzero().flatten()
    high = off[torch.randperm(len(off), generator=torch.Generator().manual_seed(int(g.initial_seed())))[:2100]]
    out = torch.where(sampled.to(x.device), x, x * 0.1 - 1000.0)
    out[:, high.to(x.device)] = 1000.0 + x[:, high.to(x.device)]
    return out


def check(x: torch.Tensor, k: int, sorted_: bool, where: str = "", **launch) -> torch.Tensor:
    """Run the kernel on rows ``x [R, T]``; assert the selection, tie rule and order; return the paths."""
    R, T = x.shape
    out = torch.full((R, k), -7, dtype=torch.int32, device=x.device)
    path = torch.full((R,), -1, dtype=torch.int32, device=x.device)
    tk._launch(x, out, k, sorted=sorted_, path=path, **launch)
    out, xc = out.cpu(), x.cpu()
    assert bool(((out >= 0) & (out < T)).all()), f"unwritten or out of range: {where}"
    srt = out.sort(-1).values
    assert not bool((srt[:, 1:] == srt[:, :-1]).any()), f"duplicates: {where}"
    got = torch.gather(xc, 1, out.long())
    want = torch.topk(xc, k, dim=-1).values
    assert torch.equal(got.sort(-1, descending=True).values, want), f"selected scores differ: {where}"
    thr = want[:, -1:]
    for r in range(R):
        o, v = out[r].long(), got[r]
        ties = (xc[r] == thr[r]).nonzero().flatten()
        m = int((v > thr[r]).sum())
        assert torch.equal(o[m:].sort().values, ties[: k - m]), f"tie rule (lowest indices): {where} row {r}"
        if sorted_:
            assert bool((v[1:] <= v[:-1]).all()), f"not descending: {where}"
            assert bool(((v[1:] != v[:-1]) | (o[1:] > o[:-1])).all()), f"equal scores not by index: {where}"
        else:
            assert torch.equal(o[:m], o[:m].sort().values) and torch.equal(o[m:], ties[: k - m]), where
    return path.cpu()


def check_kth_key_bounds(g: torch.Generator) -> None:
    """``_kth_key`` given bounds of the K-th key (tight, loose, none) returns torch's K-th key: the steps whose
    bits the bounds share are taken from them, not counted (keys here are ints, the kernel's int32 keys)."""
    from kth_probe import kth_key_probe

    for case in range(12):
        span = 1 << int(torch.randint(1, 31, (1,), generator=g))
        base = int(torch.randint(-(1 << 31) + span, (1 << 31) - span, (1,), generator=g))
        keys = torch.randint(base, base + span, (256,), generator=g, dtype=torch.int64).to(torch.int32)
        K = int(torch.randint(1, 257, (1,), generator=g))
        want = int(torch.topk(keys, K).values[-1])
        top = int(keys.max())
        for lo, hi in ((want, want), (want, top), (int(keys.min()), top), (-(1 << 31), (1 << 31) - 1)):
            out = torch.zeros(1, dtype=torch.int32)
            kth_key_probe[(1,)](keys, out, K, lo, hi, N=256)
            assert int(out) == want, f"case {case}: K={K} bounds [{lo}, {hi}]: got {int(out)}, want {want}"


def main() -> None:
    seed = int(os.environ.get("TOPK_CASES_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed {seed} (TOPK_CASES_SEED reruns it)", flush=True)  # a failure's output names its rows
    g = torch.Generator().manual_seed(seed)
    check_kth_key_bounds(g)
    seen = {"split": set(), "one_program": set()}
    for name, R, T, k, launch, kinds, paths in CASES:
        if "splits" in launch:  # not vacuous: the row really is cut into several programs
            assert tk.split_plan(R, T, launch["splits"])["NSPLIT"] > 1, name
        for kind in kinds:
            for sorted_ in (False, True):
                where = f"{name} {kind} sorted={sorted_} R={R} T={T} k={k} {launch}"
                got = check(rows(kind, R, T, g), k, sorted_, where, **launch)
                if paths is not None and kind == "randn":
                    assert set(got.tolist()) <= paths, f"{where}: paths {got.tolist()}, expected {paths}"
                seen[launch.get("algorithm", "split")] |= set(got.tolist())
    assert seen["split"] >= {1, 2, 3} and seen["one_program"] >= {1, 2, 3}, f"paths exercised: {seen}"
    seen = seen["split"] | seen["one_program"]
    assert seen == {0, 1, 2, 3}, f"paths exercised: {sorted(seen)}"  # not passing vacuously
    print("ok", sorted(seen))


if __name__ == "__main__":
    sys.exit(main())
