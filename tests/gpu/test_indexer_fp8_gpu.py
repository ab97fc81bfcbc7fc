"""The fp8 indexer scoring on the GPU (skipped without CUDA + Triton; the CPU side: tests/test_indexer_fp8.py).

The Triton quantiser must give the torch reference's bytes and scales; the fp8 logits kernel must give the
torch reference of the same fp8 math (quantise, dequantise, fp32 matmul) up to the fp8 MMA's internal
accumulation, far closer than either is to the exact bf16 path; its selected sets must agree with the
bf16 kernel's above the CPU tests' threshold; and the pass must put the fp8 op into a CUDA model's F layers.
"""

import pytest
import torch

from fx_indexcache import IndexCacheConfig, IndexCachePass
from fx_indexcache.fuse.kernels import indexer_fp8 as f8
from fx_indexcache.fuse.kernels import lightning_indexer as li
from fx_indexcache.integrations.backend import aten_graph_backend
from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel
from gpu_marks import needs_gpu

pytestmark = needs_gpu

AGREEMENT = 0.93  # as tests/test_indexer_fp8.py (its docstring derives it)
KERNEL_REL_TOL = 2e-3  # fp8 kernel vs the torch fp8 reference (the fp8 vs exact gap is ~4e-2)


def _inputs(B, S, T, H, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, S, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, T, D, device="cuda", generator=g)
    k = (k * torch.exp2(torch.randint(-4, 5, (B, T, 1), device="cuda", generator=g).float())).bfloat16()
    w = torch.randn(B, S, H, device="cuda", generator=g)
    return q, k, w


def _rel(a, b):
    seen = torch.isfinite(b)
    assert torch.equal(seen, torch.isfinite(a))
    return ((a[seen] - b[seen]).norm() / b[seen].norm()).item()


def test_triton_quantiser_gives_the_reference_bytes():
    q, k, _ = _inputs(2, 33, 70, 8, 128)
    q[0, 3, 2] = 0
    for x in (q, k, q.permute(0, 2, 1, 3)):
        x8, s = f8.quantize_rows(x)
        r8, rs = f8.quantize_rows_reference(x)
        assert torch.equal(x8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(s, rs)


@pytest.mark.parametrize("B,S,T,kv", [(1, 256, 2048, None), (2, 100, 777, [777, 500]), (4, 1, 4096, [4096, 10, 3000, 1]),
                                      (2, 12, 1500, None)])
def test_fp8_kernel_equals_the_fp8_reference(B, S, T, kv):
    q, k, w = _inputs(B, S, T, 64, 128, seed=S)
    kv_lens = None if kv is None else torch.tensor(kv, device="cuda", dtype=torch.int32)
    got = f8.indexer_logits_fp8(q, k, w, causal=True, scale=0.1, kv_lens=kv_lens)
    ref = f8.indexer_logits_fp8_reference(q, k, w, causal=True, scale=0.1, kv_lens=kv_lens)
    exact = li.indexer_logits_reference(q, k, w, causal=True, scale=0.1, kv_lens=kv_lens)
    to_ref, to_exact = _rel(got, ref), _rel(got, exact)
    print(f"B={B} S={S} T={T}: fp8 kernel vs fp8 reference {to_ref:.2e}, vs exact {to_exact:.2e}")
    assert to_ref <= KERNEL_REL_TOL and to_ref < 0.1 * to_exact


def test_fp8_selected_sets_agree_with_the_bf16_kernel():
    q, k, w = _inputs(1, 512, 16384, 64, 128, seed=3)
    bf16 = li.indexer_logits(q, k, w, causal=True, scale=128**-0.5)
    fp8 = f8.indexer_logits_fp8(q, k, w, causal=True, scale=128**-0.5)
    a, b = bf16.topk(1024, -1).indices, fp8.topk(1024, -1).indices
    chosen = torch.zeros_like(bf16, dtype=torch.bool).scatter_(-1, a, True)
    assert chosen.gather(-1, b).float().mean().item() >= AGREEMENT


def test_pass_puts_the_fp8_op_into_a_cuda_models_f_layers():
    cfg = DSAModelConfig.tiny(num_layers=3, first_k_dense_layers=3, index_n_heads=16, index_head_dim=64,
                              index_topk=32, max_seq_len=256)
    model = ReferenceDSAModel(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (2, 128), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    graph_pass = IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_pattern="FSF", indexer_precision="fp8"))

    def backend(gm, example_inputs):
        def rewrite(module):
            graph_pass(module.graph)
            module.recompile()
            return module.forward

        return aten_graph_backend(rewrite)(gm, example_inputs)

    with torch.no_grad():
        _, idx = torch.compile(model, backend=backend)(ids, None, 0, True)
        _, want = model(ids, None, 0, True)
    report = graph_pass.reports[-1]
    assert [(r.layer, r.applied, r.reason) for r in report.precision] == [(0, "fp8", None), (2, "fp8", None)], report.format()
    got, ref = idx[0][:, 32:], want[0][:, 32:]
    chosen = torch.zeros(*ref.shape[:2], 128, dtype=torch.bool, device="cuda").scatter_(-1, ref, True)
    assert chosen.gather(-1, got).float().mean().item() >= AGREEMENT
