"""Checks of ``kernels.fused_score_topk`` shared by the CPU interpreter test and the GPU tests.

``check_selection(x, got, sorted_)`` asserts, row by row, that ``got`` (int32 ``[R, K]``) is the exact top-k of
the scores ``x [R, T]`` under the project's tie rule: every key above the k-th score, then the lowest-indexed
keys equal to it -- compared as sets, so an exact tie is never "handled" by accepting any answer. The
interpreter cases build q, k and the weights from small integers, so every score is an exact fp32 sum (the
kernel's and the reference's agree bit for bit, ties included); sorted output must be descending with equal
scores by ascending index. Run as a script under ``TRITON_INTERPRET=1`` it runs every path of the fused kernels
(direct, candidates, threshold ties, fallback inline and pooled, masked tail), in both scoring layouts and with
the select in the scoring kernel's last program, on small shapes, and asserts each path ran.
``FUSED_TOPK_FILTER=atomic`` (or ``scan``, the default) chooses the filter they all run (``FusedTopkConfig.filter``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from fx_indexcache.fuse.kernels import fused_score_topk as fz


def check_selection(x: torch.Tensor, got: torch.Tensor, sorted_: bool, where: str = "") -> None:
    """``got [R, K]`` is the top-k of ``x [R, T]`` with ties at the k-th score going to the lowest indices."""
    R, T = x.shape
    K = got.shape[1]
    got, x = got.cpu().long(), x.cpu()
    assert bool(((got >= 0) & (got < T)).all()), f"unwritten or out of range: {where}"
    srt = got.sort(-1).values
    assert not bool((srt[:, 1:] == srt[:, :-1]).any()), f"duplicate indices: {where}"
    kth = torch.topk(x, K, dim=-1).values[:, -1:]
    for r in range(R):
        above = (x[r] > kth[r]).nonzero().flatten()
        ties = (x[r] == kth[r]).nonzero().flatten()
        want = set(above.tolist()) | set(ties[: K - above.numel()].tolist())
        have = set(got[r].tolist())
        assert have == want, (f"{where} row {r}: k-th score {float(kth[r])}; missing {sorted(want - have)[:8]}, "
                              f"extra {sorted(have - want)[:8]} (scores {x[r, sorted(have - want)[:8]].tolist()})")
        if sorted_:
            v = x[r, got[r]]
            assert bool((v[1:] <= v[:-1]).all()), f"{where} row {r}: not descending"
            assert bool(((v[1:] != v[:-1]) | (got[r, 1:] > got[r, :-1])).all()), f"{where} row {r}: equal scores " \
                "not by ascending index"


def integer_inputs(kind: str, B: int, S: int, T: int, H: int, D: int, g: torch.Generator, dtype=torch.float16):
    """q, k, weights of small integers (exact scores in fp32). ``kind``: "ints" (many distinct scores, some
    ties), "coarse" (0/1 entries: a few dozen distinct scores, many ties), "zero" (zero weights: every visible
    score is 0)."""
    if kind == "coarse":
        q = torch.randint(0, 2, (B, S, H, D), generator=g)
        k = torch.randint(0, 2, (B, T, D), generator=g)
        w = torch.randint(0, 2, (B, S, H), generator=g)
    else:
        q = torch.randint(-3, 4, (B, S, H, D), generator=g)
        k = torch.randint(-3, 4, (B, T, D), generator=g)
        # "ints": weights 1 or 2, so no row's weights are all 0 (such a row scores every key 0: a legitimate masked
        # tail, which a case expecting the candidates path would take for a path bug)
        w = torch.randint(1, 3, (B, S, H), generator=g) * (0 if kind == "zero" else 1)
    return q.to(dtype), k.to(dtype), w.float()


def run_case(q, k, w, K, *, causal, sorted_, where, kv_lens=None, bias=None, drop=None, **launch) -> list[int]:
    """Launch the fused kernels with ``launch`` overrides; check against the reference scores; return the paths."""
    B, S = q.shape[:2]
    T = k.shape[1]
    kk = min(K, T)
    out = torch.full((B, S, kk), -7, dtype=torch.int32, device=q.device)
    path = torch.full((B * S,), -1, dtype=torch.int32, device=q.device)
    fz._launch(q, k, w, out, causal=causal, scale=1.0, kv_lens=kv_lens, sorted=sorted_, bias=bias, drop=drop,
               path=path, **launch)
    x = fz.masked_reference_scores(q, k, w, causal=causal, kv_lens=kv_lens, bias=bias, drop=drop)
    check_selection(x.reshape(B * S, T), out.reshape(B * S, kk), sorted_, where)
    paths = path.cpu().tolist()
    assert all(p in fz.PATHS for p in paths), f"{where}: a row recorded no path: {paths}"
    return paths


PREFILL = fz.FusedTopkConfig("prefill", block_s=16, block_t=64, sample_block_t=32, num_warps=4, num_stages=1,
                             select_warps=4)
DECODE = fz.FusedTopkConfig("decode", block_s=1, block_t=64, sample_block_t=32, num_warps=4, num_stages=1,
                            select_warps=4)
DECODE_SQ2 = fz.FusedTopkConfig("decode", block_s=2, block_t=64, sample_block_t=32, num_warps=4,
                                                    num_stages=1, select_warps=4)
SMALL = dict(cap=256, sample=128)
#: capacities the sample overflows on most rows of 600 keys (k = 40): the fallback runs
TIGHT = dict(cap=64, sample=64)

#: (name, B, S, T, H, D, K, input kind, causal, extra, launch overrides, paths every row must take or None).
#: extra: "kv" (kv_lens with a short row and an empty one), "bias" (a random additive mask), "tail" (an additive
#: mask of -1e30 past each row's first 10 keys: a masked tail of equal finite scores), "drop" (a random drop mask
#: and one row dropped whole).
CASES = [
    ("direct", 2, 3, 100, 2, 16, 16, "ints", True, "", dict(config=PREFILL), {0}),
    ("candidates_prefill", 2, 5, 600, 4, 16, 16, "ints", False, "bias", dict(config=PREFILL, **SMALL), {1}),
    ("candidates_decode_sq2", 2, 3, 600, 3, 32, 16, "ints", True, "", dict(config=DECODE_SQ2, **SMALL), {1}),
    ("select_last_decode", 1, 1, 600, 4, 16, 32, "ints", False, "", dict(config=DECODE, **SMALL), {1}),
    ("threshold_ties", 1, 4, 600, 2, 16, 16, "coarse", False, "", dict(config=PREFILL, tie_cap=1024, **SMALL),
     None),
    ("kv_lens_short_and_empty", 2, 3, 600, 2, 16, 24, "ints", True, "kv",
     dict(config=PREFILL, tie_cap=1024, **SMALL), None),
    ("masked_tail", 1, 3, 600, 2, 16, 16, "ints", False, "tail", dict(config=PREFILL, **SMALL), {4}),
    ("zero_scores_masked_tail", 1, 2, 600, 2, 16, 16, "zero", False, "", dict(config=PREFILL, **SMALL), {4}),
    ("fallback_inline_select_last", 1, 1, 600, 2, 16, 16, "zero", True, "drop", dict(config=DECODE, **SMALL), {3}),
    ("fallback_pool", 2, 2, 600, 2, 16, 40, "ints", True, "drop",
     dict(config=PREFILL, fallback_inline=False, fallback_programs=2, **TIGHT), {3, 4}),
    ("fallback_inline_prefill", 1, 4, 600, 2, 16, 40, "ints", False, "", dict(config=PREFILL, **TIGHT), None),
]


def masks_for(extra: str, B: int, S: int, T: int, g: torch.Generator):
    kv_lens = bias = drop = None
    if extra == "kv":
        kv_lens = torch.tensor([10, 0] + [T] * (B - 2), dtype=torch.int32)[:B]
    elif extra == "bias":
        bias = torch.randint(-8, 8, (S, T), generator=g).float()  # broadcast over the batch
    elif extra == "tail":
        bias = torch.zeros(B, S, T)
        bias[..., 10:] = -1e30  # fewer finite keys than k: the tail's ties fill up
    elif extra == "drop":
        drop = torch.rand(B, 1, T, generator=g) < 0.3  # broadcast over the queries
        drop[-1] = True if B > 1 else drop[-1]  # the last batch row (of several): every key dropped
    return kv_lens, bias, drop


def main() -> None:
    seed = int(os.environ.get("FUSED_TOPK_CASES_SEED", "0"))  # fixed in the suite; set it to explore others
    print(f"seed {seed} (FUSED_TOPK_CASES_SEED chooses another)", flush=True)
    g = torch.Generator().manual_seed(seed)
    placing = os.environ.get("FUSED_TOPK_FILTER", fz.FusedTopkConfig().filter)
    print(f"filter {placing}", flush=True)
    seen: set[int] = set()
    for i, (name, B, S, T, H, D, K, kind, causal, extra, launch, expect) in enumerate(CASES):
        t0 = time.time()
        launch = dict(launch, config=dataclasses.replace(launch["config"], filter=placing))
        q, k, w = integer_inputs(kind, B, S, T, H, D, g)
        kv_lens, bias, drop = masks_for(extra, B, S, T, g)
        sorted_ = i % 2 == 1  # half the cases sorted: each path is reached both ways across the list
        where = f"{name} B={B} S={S} T={T} H={H} D={D} K={K} causal={causal} {extra} sorted={sorted_} {launch}"
        paths = run_case(q, k, w, K, causal=causal, sorted_=sorted_, where=where, kv_lens=kv_lens, bias=bias,
                         drop=drop, **launch)
        if expect is not None:
            assert set(paths) <= expect, f"{where}: paths {paths}, expected {expect}"
        seen |= set(paths)
        print(f"{name}: paths {paths} sorted={sorted_} ({time.time() - t0:.1f} s)", flush=True)
    assert seen == set(fz.PATHS), f"paths exercised: {sorted(seen)}, expected {sorted(fz.PATHS)}"
    print("ok", sorted(seen))


if __name__ == "__main__":
    sys.exit(main())
