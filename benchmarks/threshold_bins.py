"""How many candidates a top-k threshold taken from fixed key-range bins keeps, against the sampled threshold.

The decode top-k spends a quarter of its block on the sampled threshold (docs/kernels.md). A producer that sees every
key, the logits kernel, could count its keys into fixed bins of the order-preserving key instead: a bin is a sign, an
exponent and the top ``m`` mantissa bits (2^m bins an octave). The top-k would then take the lower edge of the bin
holding the k-th key as its threshold, knowing the candidate count before it filters. This script measures, on the
CPU, what that count is for each ``m`` and what the sampled threshold (``topk.plan``'s sample and rank, as the
kernels take them) keeps on the same rows, and how often the k-th score is negative (bins over positive scores alone
would miss those rows: the bins must span the whole key range, 2^(9 + m) of them). Rows: the benchmarks' synthetic indexer logits (``bench_indexer_kernel.make_inputs``'s
distributions, V3.2's 64 heads x 128), the same with half the keys masked, and randn.

    python benchmarks/threshold_bins.py --out benchmarks/results/threshold_bins.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from fx_indexcache.fuse.kernels import topk as tk  # noqa: E402
from fx_indexcache.fuse.kernels.topk_cuda import ukeys as keys  # noqa: E402

HEADS, DIM = 64, 128
MANTISSA_BITS = (2, 3, 4, 5, 6)


def row(kind: str, T: int, g: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(T, generator=g)
    q = torch.randn(HEADS, DIM, generator=g).bfloat16().float()
    k = torch.randn(T, DIM, generator=g).bfloat16().float()
    w = (torch.randn(HEADS, generator=g) * HEADS**-0.5).bfloat16().float()
    x = ((q @ k.T * DIM**-0.5).relu() * w[:, None]).sum(0)
    if kind == "logits, half masked":
        x[T // 2:] = float("-inf")
    return x


def measure(kind: str, T: int, K: int, g: torch.Generator) -> dict:
    u = keys(row(kind, T, g))
    kth = int(u.sort(descending=True).values[K - 1])
    out = {f"m{m}": int((u >= (kth >> (23 - m)) << (23 - m)).sum()) for m in MANTISSA_BITS}
    p = tk.plan(T, K)
    i = torch.arange(p["NB"] * p["SB"])
    sample = u[(i // p["SB"]) * T // p["NB"] + i % p["SB"]]
    out["sampled"] = int((u >= sample.sort(descending=True).values[p["R_SAMPLE"] - 1]).sum())
    out["negative"] = kth < 0x80000000
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=16, help="rows of each kind")
    parser.add_argument("--T", type=int, default=32768)
    parser.add_argument("--k", type=int, default=2048)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    results = []
    print(f"candidates kept, k = {args.k}, T = {args.T}, {args.rows} rows a kind: min / mean / max")
    print("| rows | " + " | ".join(f"bins, m = {m}" for m in MANTISSA_BITS) + " | sampled | k-th score negative |")
    print("|---|" + "---|" * (len(MANTISSA_BITS) + 2))
    for kind in ("logits", "logits, half masked", "randn"):
        rs = [measure(kind, args.T, args.k, g) for _ in range(args.rows)]
        summary = {c: dict(min=min(r[c] for r in rs), mean=round(statistics.mean(r[c] for r in rs), 1),
                           max=max(r[c] for r in rs)) for c in rs[0] if c != "negative"}
        results.append(dict(kind=kind, rows=args.rows, candidates=summary,
                            k_th_negative=sum(r["negative"] for r in rs)))
        cells = [f"{s['min']} / {s['mean']:.0f} / {s['max']}" for s in summary.values()]
        print(f"| {kind} | " + " | ".join(cells) + f" | {results[-1]['k_th_negative']} of {args.rows} |")
    record = dict(what=__doc__.split("\n")[0], T=args.T, k=args.k, results=results, torch=torch.__version__,
                  machine=platform.machine(), date=time.strftime("%Y-%m-%d"))
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
