"""The paged decode logits kernel on the GPU (skipped without CUDA + Triton; the CPU side: tests/test_paged_decode.py).

At V3.2's sizes (64 heads x 128, pages of 64 tokens shuffled in one pool), bf16 and fp8 keys: the paged kernel must
give the contiguous decode kernel's logits on the same keys (same fp32 math, same products, so equal up to the
order of the head sum), replay under a CUDA graph with new lengths written into the captured buffers, and pass
compute-sanitizer's memcheck over the interpreter cases run on the card (a block-table entry past a request's
length points outside the pool: reading it is an error).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fx_indexcache.fuse.kernels import indexer_fp8 as f8
from fx_indexcache.fuse.kernels import lightning_indexer as li
from fx_indexcache.fuse.kernels import paged_decode as pd
from gpu_marks import needs_gpu, sanitizer_path

pytestmark = needs_gpu

H, D, PAGE = 64, 128, 64


def _paged(B, T, precision, seed=0):
    """Contiguous q, k, w, their paged copy (pages shuffled in a pool with spare pages) and the operands."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, 1, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, T, D, device="cuda", generator=g).bfloat16()
    w = torch.randn(B, 1, H, device="cuda", generator=g) * D**-0.5
    n = T // PAGE
    pool_pages = B * n + 7
    table = torch.randperm(pool_pages, device="cuda", generator=g)[: B * n].view(B, n).int()
    if precision == "fp8":
        ops = f8.quantize_operands(q, k, w, 1.0)
        q, k, w, ks = ops.q8, ops.k8, ops.weights, ops.k_scale
    else:
        ks = None
    pool = torch.zeros(pool_pages, PAGE, D, device="cuda", dtype=k.dtype)
    pool[table.view(-1).long()] = k.reshape(B * n, PAGE, D)
    pool_scale = None
    if ks is not None:
        pool_scale = torch.zeros(pool_pages, PAGE, device="cuda")
        pool_scale[table.view(-1).long()] = ks.reshape(B * n, PAGE)
    return q, k, w, ks, pool, pool_scale, table


#: The default launch and the sweep's kinds of launch (several key blocks a program, 8 warps, blocks of 128 keys;
#: the keys on the M side, a block a page or two pages, one to four blocks a program).
PAGED_CONFIGS = [None, pd.LogitsConfig("decode", 1, 64, 4, 2, key_blocks=4),
                 pd.LogitsConfig("decode", 1, 128, 8, 3, key_blocks=8),
                 pd.LogitsConfig("key_rows", 1, 64, 4, 2, key_blocks=4),
                 pd.LogitsConfig("key_rows", 1, 128, 4, 1)]


@pytest.mark.parametrize("config", PAGED_CONFIGS, ids=lambda c: "default" if c is None else c.name())
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("B,T", [(1, 32768), (4, 8192), (16, 4096)])
def test_paged_equals_the_contiguous_decode_kernel(precision, B, T, config):
    q, k, w, ks, pool, pool_scale, table = _paged(B, T, precision)
    lens = torch.tensor([T - 37 * i for i in range(B)], dtype=torch.int32, device="cuda")
    got = pd.paged_decode_logits(q, pool, w, table, lens, k_scale=pool_scale, config=config)
    want = li.launch_into(q, k, w, None, True, 1.0, lens, None, k_scale=ks)
    seen = torch.isfinite(want)
    assert torch.equal(seen, torch.isfinite(got))
    torch.testing.assert_close(got[seen], want[seen], rtol=1e-4, atol=1e-3)
    ref = pd.paged_decode_logits_reference(q.float() if precision == "fp8" else q, pool, w, table, lens,
                                           k_scale=pool_scale)
    rel = ((got[seen] - ref[seen]).norm() / ref[seen].norm()).item()
    assert rel < 2e-3, rel


def test_paged_decode_replays_in_a_cuda_graph_with_new_lengths():
    q, k, w, ks, pool, pool_scale, table = _paged(4, 8192, "fp8")
    lens = torch.full((4,), 8192, dtype=torch.int32, device="cuda")
    out = torch.empty(4, 1, 8192, device="cuda")
    pd.paged_decode_logits(q, pool, w, table, lens, k_scale=pool_scale, out=out)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pd.paged_decode_logits(q, pool, w, table, lens, k_scale=pool_scale, out=out)
    lens.copy_(torch.tensor([5, 4096, 8000, 1], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    want = pd.paged_decode_logits(q, pool, w, table, lens.clone(), k_scale=pool_scale)
    assert torch.equal(torch.isfinite(out), torch.isfinite(want))
    assert int(torch.isfinite(out[0]).sum()) == 5 and int(torch.isfinite(out[3]).sum()) == 1


def test_compute_sanitizer_memcheck_finds_no_read_past_a_length():
    sanitizer = sanitizer_path()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not installed")
    tests = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    done = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "3", sys.executable,
                           str(tests / "paged_decode_cases.py"), "--device", "cuda"],
                          env=env, capture_output=True, text=True, timeout=1200)
    out = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, out
    assert "ERROR SUMMARY: 0 errors" in out and "ok 52 cases" in out, out
