"""The logits kernel counting its keys into the top-k's bins (``indexer_logits(bins=...)``, key-rows launches):
under Triton's CPU interpreter against ``topk_cuda.row_bins`` of its own logits (``tests/logits_bins_cases.py``),
and refused for the kernels that do not count."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fx_indexcache.fuse.kernels import lightning_indexer as li
from fx_indexcache.fuse.kernels import topk_cuda

HERE = Path(__file__).resolve().parent


def test_key_rows_counts_equal_the_bins_of_its_logits_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    done = subprocess.run([sys.executable, str(HERE / "logits_bins_cases.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ok 24 cases" in done.stdout


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_kernels_that_do_not_count_refuse_bins(kind):
    q, k, w = torch.zeros(1, 1, 4, 32).half(), torch.zeros(1, 16, 32).half(), torch.zeros(1, 1, 4)
    bins = torch.zeros(1, topk_cuda.ROW_BINS, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"kind 'key_rows' launches only, got LogitsConfig.kind='{kind}'"):
        li._launch(q, k, w, torch.empty(1, 1, 16), True, 1.0, None, li.LogitsConfig(kind, 1, 16, 4, 1), bins=bins)
