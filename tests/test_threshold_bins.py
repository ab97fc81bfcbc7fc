"""benchmarks/threshold_bins.py, the design figure for a top-k threshold from fixed key-range bins: its counts obey
what a bin threshold must (at least k kept, finer bins keep no more)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import threshold_bins  # noqa: E402


def test_a_bin_threshold_keeps_k_or_more_and_finer_bins_keep_no_more():
    g = torch.Generator().manual_seed(1)
    for kind in ("logits", "logits, half masked", "randn"):
        for _ in range(3):
            r = threshold_bins.measure(kind, 4096, 256, g)
            kept = [r[f"m{m}"] for m in threshold_bins.MANTISSA_BITS]
            assert all(a >= b for a, b in zip(kept, kept[1:])), (kind, kept)
            assert kept[-1] >= 256 and r["sampled"] >= 1, (kind, r)
