"""Opt-in fp8 indexer scoring (``indexer_precision="fp8"``) on the CPU: the config key, the quantisation,
the reference math, the agreement of the selected sets with the exact path, and what the pass does and
reports where fp8 cannot run.

Off CUDA the fp8 op (``fx_indexcache::indexer_logits_fp8``) runs its torch reference (quantise with
``torch.float8_e4m3fn``, dequantise, fp32 matmul), the same math as the kernel; the GPU kernel itself is
checked in tests/gpu/test_indexer_fp8_gpu.py and, under Triton's interpreter, below.

Agreement threshold, 0.93 of the k selected keys on average. e4m3 keeps 3 mantissa bits: each
quantised element is off by up to 2^-4 of itself (uniformly, ~3.6 % RMS), so a score ``q.k`` over D
independent products carries ~4 % relative noise, as measured (``relerr`` ~0.037 below). A key flips
in or out of the top-k when its score lies within that noise of the k-th score: for Gaussian scores with
k/T = 1/16, about 2 x 0.04 x phi(1.53) ~ 1 % of all keys = 16 % of k are that close, and about a quarter
of them flip, i.e. ~4 % of the set: measured 0.960-0.966 on random rows (9 draws, several H, D, k) and
0.973-0.981 on the shipped trained checkpoint's layers. 0.93 leaves room for draw-to-draw spread
(< 0.01 measured) and still fails for a wrong scale: with the per-key scale dropped, on keys of unequal
size (2^U(0, 4)), the agreement falls to 0.46 (measured; the check below).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import KEYED, trace_one_topk

from fx_indexcache import IndexCacheConfig, IndexCachePass
from fx_indexcache.fuse import substitute as kernel_substitution
from fx_indexcache.fuse.kernels import indexer_fp8 as f8
from fx_indexcache.fuse.kernels import lightning_indexer as li
from fx_indexcache.fuse.precision import Fp8NotApplied
from fx_indexcache.integrations.backend import aten_graph_backend
from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel, corpus
from fx_indexcache.models.reference.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
AGREEMENT = 0.93


def agreement(exact: torch.Tensor, other: torch.Tensor, k: int) -> float:
    """Mean over rows of |top-k set of exact & top-k set of other| / k."""
    a, b = exact.topk(k, dim=-1).indices, other.topk(k, dim=-1).indices
    chosen = torch.zeros_like(exact, dtype=torch.bool).scatter_(-1, a, True)
    return chosen.gather(-1, b).float().sum(-1).mean().item() / k


def _inputs(seed: int, B=1, S=32, T=2048, H=16, D=128):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g).bfloat16()
    k = torch.randn(B, T, D, generator=g).bfloat16()
    w = torch.randn(B, S, H, generator=g)
    return q, k, w


# ------------------------------------------------------------------------------------------ config


def test_default_is_bf16_and_fp8_is_accepted():
    assert IndexCacheConfig().indexer_precision == "bf16"
    assert IndexCacheConfig(indexer_precision="fp8").indexer_precision == "fp8"
    config, rest = IndexCacheConfig.from_options({"indexer_precision": "fp8", "max_autotune": False})
    assert config.indexer_precision == "fp8" and rest == {"max_autotune": False}
    assert IndexCacheConfig.from_hf_config({"indexer_precision": "fp8"}).indexer_precision == "fp8"


@pytest.mark.parametrize("bad", ["fp16", "FP8", "", 8, None, True])
def test_bad_precision_is_refused_naming_field_value_and_choices(bad):
    with pytest.raises(ValueError) as err:
        IndexCacheConfig(indexer_precision=bad)
    message = str(err.value)
    assert "indexer_precision" in message and repr(bad) in message
    assert '"bf16"' in message and '"fp8"' in message


def test_precision_is_part_of_the_pass_uuid():
    bf16, fp8 = (IndexCachePass(index_topk_freq=4, indexer_precision=p, context=KEYED) for p in ("bf16", "fp8"))
    assert bf16.config.fingerprint() != fp8.config.fingerprint()
    assert bf16.uuid() != fp8.uuid()
    assert IndexCachePass(index_topk_freq=4, context=KEYED).uuid() == bf16.uuid()  # bf16 is the default


# ------------------------------------------------------------------------------------ quantisation


def test_quantisation_round_trips_with_per_token_power_of_two_scales():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 128, generator=g) * torch.exp2(torch.randint(-20, 21, (6, 5, 1), generator=g).float())
    x[0, 0] = 0.0  # an all-zero row: finite scale, zeros back
    x = x.bfloat16()
    x8, scale = f8.quantize_rows_reference(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and scale.shape == x.shape[:-1]
    mantissa, _ = torch.frexp(scale)
    assert torch.all(mantissa == 0.5), "every scale is a power of two"
    amax = x.float().abs().amax(-1)
    sized = amax >= f8.AMAX_FLOOR  # tinier rows (and the zero row) share the floor's scale
    ratio = amax[sized] / scale[sized]
    assert torch.all((ratio > 224) & (ratio <= 448)), "the largest element lands in e4m3's top binade"
    floor_scale = 2.0 ** torch.ceil(torch.log2(torch.tensor(f8.AMAX_FLOOR / 448)))
    assert (~sized).sum() >= 2 and torch.all(scale[~sized] == floor_scale)
    back = x8.float() * scale.unsqueeze(-1)
    assert torch.all(back[0, 0] == 0) and torch.isfinite(scale).all()
    xf = x.float()
    normal = xf.abs() >= scale.unsqueeze(-1) * 2.0**-6  # e4m3 normals: 3 mantissa bits, half-ulp 2^-4
    err = (back - xf).abs()
    assert torch.all(err[normal] <= xf.abs()[normal] * 2.0**-4)
    assert torch.all(err[~normal] <= (scale.unsqueeze(-1) * 2.0**-10).expand_as(xf)[~normal])  # subnormal step 2^-9
    assert (err[normal] > 0).any(), "the check saw real rounding"


def test_scales_are_per_row_rescaling_one_token_changes_only_its_scale():
    q, _, _ = _inputs(1, S=4, H=3, D=64)
    q8, qs = f8.quantize_rows_reference(q)
    q2 = q.clone()
    q2[0, 2, 1] *= 2.0**7  # one (token, head) row
    q8b, qsb = f8.quantize_rows_reference(q2)
    assert torch.equal(q8.view(torch.uint8), q8b.view(torch.uint8)), "a power-of-two rescale keeps the e4m3 bytes"
    changed = qsb != qs
    assert changed.sum() == 1 and changed[0, 2, 1] and qsb[0, 2, 1] == qs[0, 2, 1] * 2.0**7


# ----------------------------------------------------------------------------- the reference math


def test_fp8_reference_is_the_dequantised_product_and_differs_from_exact():
    q, k, w = _inputs(2, S=16, T=300, H=8, D=64)
    got = f8.indexer_logits_fp8_reference(q, k, w, causal=True, scale=0.125)
    q8, qs = f8.quantize_rows_reference(q)
    k8, ks = f8.quantize_rows_reference(k)
    qd, kd = (q8.double() * qs.double().unsqueeze(-1)), (k8.double() * ks.double().unsqueeze(-1))
    want = torch.einsum("bsh,bsht->bst", w.double(), torch.relu(torch.einsum("bshd,btd->bsht", qd, kd) * 0.125))
    visible = torch.isfinite(got)
    assert visible.sum() == 16 * 300 - 120  # the queries are the last 16 of 300 keys: 15 + 14 + ... hidden
    torch.testing.assert_close(got[visible].double(), want[visible], rtol=1e-5, atol=1e-5)
    exact = li.indexer_logits_reference(q, k, w, causal=True, scale=0.125)
    assert torch.equal(torch.isfinite(exact), visible)
    rel = ((got - exact)[visible].norm() / exact[visible].norm()).item()
    assert 5e-3 < rel < 0.08, rel  # fp8 really rounds, by e4m3's ~4 %


def test_custom_op_off_cuda_runs_the_fp8_reference():
    q, k, w = _inputs(3, S=8, T=64, H=4, D=32)
    kv = torch.tensor([50])
    got = torch.ops.fx_indexcache.indexer_logits_fp8(q, k, w, True, 0.5, kv)
    torch.testing.assert_close(got, f8.indexer_logits_fp8_reference(q, k, w, causal=True, scale=0.5, kv_lens=kv))
    assert torch.isneginf(got[..., 50:]).all()


@pytest.mark.parametrize("shape", [dict(H=16, D=128, T=2048), dict(H=64, D=128, T=4096), dict(B=2, H=8, D=32)])
@pytest.mark.parametrize("seed", [0, 1])
def test_selected_sets_agree_with_exact_on_random_rows(shape, seed):
    q, k, w = _inputs(seed, **shape)
    kk = k.shape[1] // 16
    exact = li.indexer_logits_reference(q, k, w, causal=False, scale=q.shape[-1] ** -0.5)
    fp8 = f8.indexer_logits_fp8_reference(q, k, w, causal=False, scale=q.shape[-1] ** -0.5)
    assert not torch.equal(exact, fp8)
    assert agreement(exact, fp8, kk) >= AGREEMENT


def test_selected_sets_agree_on_structured_rows_planted_keys_and_outlier_channels():
    """Rows with structure: each query's k planted keys score >= 25 % above every other key (fp8's ~4 %
    noise cannot reorder them: the planted set must be chosen exactly); and a few outlier channels 30x
    larger than the rest, as LLM activations have, which per-token scales must absorb."""
    g = torch.Generator().manual_seed(5)
    S, T, H, D, kk = 8, 1024, 4, 64, 32
    q = torch.randn(1, S, 1, D, generator=g).expand(1, S, H, D).clone()
    k = torch.randn(1, T, D, generator=g) * 0.3
    planted = torch.stack([torch.randperm(T, generator=g)[:kk] for _ in range(S)])
    k_rows = k.expand(S, T, D).clone()  # a key cache per query row: planted keys align with their query
    for s in range(S):
        k_rows[s, planted[s]] = q[0, s, 0] * (1.0 + 0.05 * torch.rand(kk, 1, generator=g)) / q[0, s, 0].norm() * 3
    w = torch.rand(1, 1, H, generator=g)
    for s in range(S):
        qs, ks = q[:, s:s + 1].bfloat16(), k_rows[s:s + 1].bfloat16()
        exact = li.indexer_logits_reference(qs, ks, w, causal=False)
        fp8 = f8.indexer_logits_fp8_reference(qs, ks, w, causal=False)
        assert set(exact.topk(kk).indices.flatten().tolist()) == set(planted[s].tolist())
        assert set(fp8.topk(kk).indices.flatten().tolist()) == set(planted[s].tolist())
    q, k, w = _inputs(6, S=32, T=2048, H=16, D=128)
    outliers = torch.ones(128)
    outliers[[3, 40, 77, 100]] = 30.0
    q, k = (q.float() * outliers).bfloat16(), (k.float() * outliers).bfloat16()
    exact = li.indexer_logits_reference(q, k, w, causal=False)
    fp8 = f8.indexer_logits_fp8_reference(q, k, w, causal=False)
    assert agreement(exact, fp8, 128) >= AGREEMENT


def test_the_agreement_check_fails_for_a_dropped_key_scale():
    """Guards the threshold: fp8 with the per-key scale left out is caught."""
    q, k, w = _inputs(7, T=2048, H=16, D=128)
    sizes = torch.exp2(torch.rand(1, 2048, 1, generator=torch.Generator().manual_seed(0)) * 4)
    k = (k.float() * sizes).bfloat16()  # keys of unequal size
    exact = li.indexer_logits_reference(q, k, w, causal=False)
    k8, _ = f8.quantize_rows_reference(k)
    q8, qs = f8.quantize_rows_reference(q)
    no_key_scale = li.indexer_logits_reference(q8.float() * qs.unsqueeze(-1), k8.float(), w, causal=False)
    assert agreement(exact, no_key_scale, 128) < AGREEMENT
    assert agreement(exact, f8.indexer_logits_fp8_reference(q, k, w, causal=False), 128) >= AGREEMENT


# -------------------------------------------------------------------------------------- the pass


class _Compiled:
    """A DSA model compiled through ``IndexCachePass`` on AOT's ATen graph, run eagerly."""

    def __init__(self, **keys) -> None:
        self.graph_pass = IndexCachePass(IndexCacheConfig(use_index_cache=True, **keys))
        self.graphs: list = []

    def __call__(self, gm, example_inputs):
        def rewrite(module):
            self.graph_pass(module.graph)
            module.recompile()
            self.graphs.append(module)
            return module.forward

        return aten_graph_backend(rewrite)(gm, example_inputs)

    def ops(self) -> set[str]:
        return {str(n.target) for gm in self.graphs for n in gm.graph.nodes if "indexer_logits" in str(n.target)}


CFG = DSAModelConfig.tiny(num_layers=3, first_k_dense_layers=3)  # all F below: the eager model is the oracle


def _run(backend: _Compiled, dtype=torch.float32):
    model = ReferenceDSAModel(CFG, seed=0, dtype=dtype)
    ids = torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(ids, None, 0, True)
        want = model(ids, None, 0, True)
    return got, want, backend.graph_pass.reports[-1]


@pytest.fixture
def fp8_ok(monkeypatch):
    """Accept every fused site for the fp8 kernel too (off CUDA the fp8 op runs its reference)."""
    monkeypatch.setattr(kernel_substitution, "fp8_refusal", lambda q, k, w, scale: None)


def test_fp8_fused_sites_run_the_fp8_op_and_agree_with_exact(sites_on_cuda, kernel_ok, fp8_ok):
    """Structured rows from a trained model: the shipped checkpoint's first 3 layers on held-out bytes."""
    model = load_checkpoint(num_layers=3)
    ids = corpus.windows(corpus.as_tokens(corpus.read_files(corpus.HELD_OUT_FILES)), 256)[:2]
    backend = _Compiled(index_topk_pattern="FSF", indexer_precision="fp8")
    with torch.no_grad():
        _, got_idx = torch.compile(model, backend=backend)(ids, None, 0, True)
        _, want_idx = model(ids, None, 0, True)
    report = backend.graph_pass.reports[-1]
    assert backend.ops() == {"fx_indexcache.indexer_logits_fp8.default"}
    assert [r.precision for r in report.fusions] == ["fp8", "fp8"] and all(r.fused for r in report.fusions)
    assert [(r.layer, r.applied, r.reason) for r in report.precision] == [(0, "fp8", None), (2, "fp8", None)]
    assert report.pattern == "FSF"
    k = model.config.index_topk
    rows = slice(k, None)  # queries that see more than k keys (the others select every key)
    got, want = got_idx[0][:, rows], want_idx[0][:, rows]  # layer 0: the same inputs in both runs
    chosen = torch.zeros(*want.shape[:2], ids.shape[1], dtype=torch.bool).scatter_(-1, want, True)
    assert not torch.equal(got.sort(-1).values, want.sort(-1).values), "fp8 really ran"
    assert chosen.gather(-1, got).float().mean().item() >= AGREEMENT


def test_default_precision_is_todays_exact_path(sites_on_cuda, kernel_ok, fp8_ok):
    backend = _Compiled(index_topk_pattern="FFF")
    (logits, got_idx), (want_logits, want_idx), report = _run(backend)
    assert backend.ops() == {"fx_indexcache.indexer_logits.default"}
    assert report.precision == [] and all(r.precision == "bf16" for r in report.fusions)
    for layer in range(3):
        assert torch.equal(got_idx[layer], want_idx[layer])


def test_on_the_cpu_fp8_is_not_applied_the_layer_stays_exact_and_the_report_says_why(caplog):
    backend = _Compiled(index_topk_pattern="FFF", indexer_precision="fp8")
    with caplog.at_level(logging.WARNING, logger="fx_indexcache"):
        (logits, got_idx), (want_logits, want_idx), report = _run(backend)
    assert backend.ops() == set() and report.fusions == []
    assert [(r.layer, r.requested, r.applied, r.reason) for r in report.precision] == [
        (layer, "fp8", "bf16", Fp8NotApplied.NOT_CUDA) for layer in range(3)]
    assert "fp8 scoring not applied" in report.format()
    assert any("indexer_precision='fp8' not applied at 3 of 3" in r.getMessage() for r in caplog.records)
    for layer in range(3):
        assert torch.equal(got_idx[layer], want_idx[layer])


def test_fusion_off_or_refused_records_the_reason(sites_on_cuda):
    off = _Compiled(index_topk_pattern="FFF", indexer_precision="fp8", fuse_indexer_kernel=False)
    *_, report = _run(off)
    assert off.ops() == set() and {r.reason for r in report.precision} == {Fp8NotApplied.FUSION_OFF}
    refused = _Compiled(index_topk_pattern="FFF", indexer_precision="fp8")  # the real check: not on CUDA
    *_, report = _run(refused)
    assert refused.ops() == set()
    assert {r.reason for r in report.precision} == {Fp8NotApplied.FUSION_REFUSED}
    assert all("CUDA" in r.detail for r in report.precision)


def test_fp8_kernel_unsupported_falls_back_to_the_bf16_fused_kernel(sites_on_cuda, kernel_ok):
    backend = _Compiled(index_topk_pattern="FFF", indexer_precision="fp8")  # real fp8 check: not on CUDA
    (_, got_idx), (_, want_idx), report = _run(backend)
    assert backend.ops() == {"fx_indexcache.indexer_logits.default"}
    assert {(r.applied, r.reason) for r in report.precision} == {("bf16", Fp8NotApplied.FP8_UNSUPPORTED)}
    assert all(r.fp8_refusal and r.precision == "bf16" for r in report.fusions)
    for layer in range(3):
        assert torch.equal(got_idx[layer], want_idx[layer])


def test_substitution_inserts_the_fp8_op_on_an_unbatched_layout(kernel_ok, fp8_ok):
    """A model written elsewhere (unbatched [S, T] score, masked_fill): the fp8 op gives the fp8 reference."""
    S, T, H, D = 12, 48, 4, 32

    def indexer(q, k, w):
        score = torch.einsum("sh,sht->st", w.float(), torch.relu(torch.einsum("shd,td->sht", q.float(), k.float())))
        future = torch.arange(T)[None, :] > (torch.arange(S)[:, None] + T - S)
        return score.masked_fill(future, float("-inf")).topk(8, dim=-1).indices

    q, k, w = (t[0] for t in _inputs(8, S=S, T=T, H=H, D=D))
    gm, topk = trace_one_topk(indexer, q, k, w)
    (record,) = kernel_substitution.substitute_fused_indexer(gm.graph, [topk], "fp8")
    assert record.fused and record.precision == "fp8", record
    gm.recompile()
    ref = f8.indexer_logits_fp8_reference(q[None], k[None], w[None], causal=True)[0]
    assert torch.equal(gm(q, k, w).sort(-1).values, ref.topk(8, dim=-1).indices.sort(-1).values)


# ------------------------------------------------------------------------- the kernel, interpreted


def test_fp8_kernel_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    done = subprocess.run([sys.executable, str(HERE / "indexer_fp8_cases.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ok 30 cases" in done.stdout
