"""The paged decode logits kernel (``fuse/kernels/paged_decode.py``): bad input named, and the kernel under
Triton's CPU interpreter against the torch reference (``tests/paged_decode_cases.py``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fx_indexcache.fuse.kernels import paged_decode as pd

HERE = Path(__file__).resolve().parent


def _inputs(dtype=torch.float16):
    q = torch.zeros(2, 1, 4, 32, dtype=dtype)
    return q, torch.zeros(5, 16, 32, dtype=dtype), torch.zeros(2, 1, 4), torch.zeros(2, 3, dtype=torch.int32), \
        torch.tensor([3, 40], dtype=torch.int32)


@pytest.mark.parametrize("change, field", [
    (lambda a: dict(a, block_table=a["block_table"].float()), "block_table"),
    (lambda a: dict(a, kv_lens=a["kv_lens"][:1]), "kv_lens"),
    (lambda a: dict(a, k_pages=a["k_pages"].to(torch.float8_e4m3fn), q=a["q"].to(torch.float8_e4m3fn)), "k_scale"),
    (lambda a: dict(a, weights=a["weights"][:, :, :2]), "weights"),
    (lambda a: dict(a, k_pages=a["k_pages"].float(), q=a["q"].float()), "k_pages"),
    (lambda a: dict(a, config=pd.LogitsConfig("prefill", 64, 64, 4, 2)), "kind 'decode'"),
    (lambda a: dict(a, config=pd.LogitsConfig("decode", 4, 64, 4, 2)), "block_s=1"),
    (lambda a: dict(a, config=pd.LogitsConfig("key_rows", 2, 64, 4, 2, queries_per_dot=2)), "queries_per_dot=1"),
    (lambda a: dict(a, config=pd.LogitsConfig("decode", 1, 48, 4, 2)), "block_t=48"),
])
def test_bad_input_names_the_field(change, field):
    q, k, w, table, lens = _inputs()
    args = change(dict(q=q, k_pages=k, weights=w, block_table=table, kv_lens=lens))
    with pytest.raises(ValueError, match=field):
        pd.paged_decode_logits(**args)


def test_without_a_measurement_the_rule_fills_the_card():
    """No card file applies here (no CUDA): the rule, its key blocks fewer where a short batch would leave SMs idle."""
    for precision in ("fp8", "bf16"):
        rule = pd.RULE_CONFIGS[precision]
        long_batch = pd.paged_config(64, 1, 32768, 64, 128, precision)
        assert long_batch == rule and long_batch.key_blocks > 1
        one_row = pd.paged_config(1, 1, 32768, 64, 128, precision)
        assert one_row.key_blocks == 1 and one_row.block_t == rule.block_t and one_row.kind == rule.kind
    assert pd.RULE_CONFIGS["fp8"].kind == "key_rows"  # the H100 sweep's winner for fp8 pages
    with pytest.raises(ValueError, match="precision='fp16'"):
        pd.paged_config(1, 1, 32768, 64, 128, "fp16")


def test_paged_decode_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    done = subprocess.run([sys.executable, str(HERE / "paged_decode_cases.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ok 52 cases" in done.stdout
