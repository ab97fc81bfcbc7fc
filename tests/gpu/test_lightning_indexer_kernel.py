"""Tests of the fused lightning-indexer kernel (fx_indexcache.fuse.kernels.lightning_indexer).

The kernel tests need CUDA and Triton and are skipped without them; the reference, the support
predicate and the custom ops' CPU fallback are checked everywhere (they are cheap).

Every kernel check draws fresh random inputs (the seed is printed in the failure message), poisons
the output with NaN first and checks that every element was written, and compares with a float64
reference computed from the same (upcast) bf16 inputs by relative norm error.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import topk_cases  # noqa: E402
from gpu_marks import needs_gpu  # noqa: E402

from fx_indexcache.fuse.kernels import topk as tk  # noqa: E402
from fx_indexcache.fuse.kernels.lightning_indexer import (  # noqa: E402
    LogitsConfig,
    indexer_logits,
    indexer_logits_reference,
    indexer_topk,
    is_supported,
    lightning_indexer,
    unsupported_reason,
)


gpu = needs_gpu

REL_TOL = 1e-3  # bf16 inputs are exact in fp32/fp64; only the fp32 accumulation order differs


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _inputs(B, S, T, H, D, *, dtype=torch.bfloat16, device="cuda", seed=0, wdtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, S, H, D, device=device, generator=g).to(dtype)
    k = torch.randn(B, T, D, device=device, generator=g).to(dtype)
    w = (torch.randn(B, S, H, device=device, generator=g) * H**-0.5).to(wdtype)
    return q, k, w


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    fin = torch.isfinite(ref)
    if not bool(fin.any()):
        return 0.0
    a, b = out.double()[fin], ref.double()[fin]
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _check_logits(B, S, T, H, D, *, causal=True, scale=1.0, kv_lens=None, config=None, dtype=torch.bfloat16,
                  wdtype=torch.float32):
    seed = _seed()
    q, k, w = _inputs(B, S, T, H, D, dtype=dtype, seed=seed, wdtype=wdtype)
    kvl = None if kv_lens is None else torch.tensor(kv_lens, device="cuda", dtype=torch.int32)
    out = torch.full((B, S, T), float("nan"), device="cuda")
    res = indexer_logits(q, k, w, causal=causal, scale=scale, kv_lens=kvl, out=out, config=config)
    torch.cuda.synchronize()
    assert res is out
    where = f"B={B} S={S} T={T} H={H} D={D} causal={causal} kv={kv_lens} cfg={config} seed={seed}"
    assert not bool(out.isnan().any()), f"unwritten (NaN-poisoned) outputs remain: {where}"
    ref = indexer_logits_reference(q, k, w, causal=causal, scale=scale, kv_lens=kvl, dtype=torch.float64)
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref)), f"mask differs: {where}"
    assert not bool(torch.isposinf(out).any()), where
    err = _rel_err(out, ref)
    assert err < REL_TOL, f"rel err {err:.3e}: {where}"
    return q, k, w, out, ref


# ----------------------------------------------------------------------------------------------
# Logits
# ----------------------------------------------------------------------------------------------

SHAPES = [
    # B, S, T, H, D
    (1, 1, 1, 64, 128),
    (1, 1, 1000, 64, 128),
    (64, 1, 777, 64, 128),
    (4, 3, 2049, 64, 128),
    (2, 8, 300, 64, 128),
    (2, 9, 300, 64, 128),
    (2, 37, 300, 64, 128),
    (3, 129, 1031, 64, 128),
    (1, 256, 256, 64, 128),
    (1, 255, 4097, 64, 128),
    (2, 200, 5000, 64, 128),
    (1, 17, 17, 8, 64),
    (1, 64, 4096, 32, 128),
    (2, 100, 333, 1, 16),
    (1, 70, 513, 128, 256),
]


@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_logits_default_config(shape, causal):
    _check_logits(*shape, causal=causal, scale=0.37)


CONFIGS = [
    LogitsConfig("prefill", 128, 128, 8, 3),
    LogitsConfig("prefill", 64, 256, 8, 4),
    LogitsConfig("prefill", 64, 128, 4, 3),
    LogitsConfig("prefill", 64, 128, 4, 3, heads_per_step=2),
    LogitsConfig("prefill", 64, 256, 8, 3),
    LogitsConfig("prefill", 16, 64, 4, 2),
    LogitsConfig("decode", 1, 128, 4, 2),
    LogitsConfig("decode", 4, 64, 4, 2),
    LogitsConfig("decode", 1, 128, 4, 3, key_blocks=4),
    LogitsConfig("decode", 4, 64, 8, 2, key_blocks=8),
    LogitsConfig("key_rows", 64, 128, 4, 3),
    LogitsConfig("key_rows", 64, 128, 8, 2, queries_per_dot=2),
    LogitsConfig("key_rows", 128, 256, 8, 3),
    LogitsConfig("key_rows", 1, 128, 4, 2, key_blocks=4),
    LogitsConfig("key_rows", 2, 64, 4, 2, queries_per_dot=2, key_blocks=8),
]


@gpu
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name())
@pytest.mark.parametrize("shape", [(2, 37, 1031, 64, 128), (1, 130, 130, 64, 128), (3, 5, 4100, 16, 128),
                                   (2, 70, 600, 3, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_logits_every_config(config, shape):
    _check_logits(*shape, config=config, scale=0.5)


@gpu
@pytest.mark.parametrize("config", [None, LogitsConfig("prefill", 64, 128, 4, 3), LogitsConfig("decode", 2, 64, 4, 2),
                                    LogitsConfig("prefill", 64, 128, 4, 3, heads_per_step=2),
                                    LogitsConfig("decode", 1, 64, 4, 3, key_blocks=4),
                                    LogitsConfig("key_rows", 1, 64, 4, 2, key_blocks=8),
                                    LogitsConfig("key_rows", 16, 64, 4, 2, queries_per_dot=2)],
                         ids=lambda c: "default" if c is None else c.name())
@pytest.mark.parametrize("causal", [True, False])
def test_logits_kv_lens(config, causal):
    # per-batch valid lengths: 0, 1, shorter than S, mid, full, longer than T (clamped)
    _check_logits(6, 40, 700, 64, 128, causal=causal, kv_lens=[0, 1, 20, 350, 700, 9999], config=config)
    _check_logits(3, 1, 2000, 64, 128, causal=causal, kv_lens=[2000, 1, 1234], config=config)


@gpu
def test_logits_fp16_and_bf16_weights():
    _check_logits(2, 33, 517, 64, 128, dtype=torch.float16)
    _check_logits(2, 33, 517, 64, 128, wdtype=torch.bfloat16)


@gpu
def test_logits_non_contiguous_inputs():
    seed = _seed()
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, S, T, H, D = 2, 45, 600, 64, 128
    q = torch.randn(B, H, S, D, device="cuda", generator=g).bfloat16().transpose(1, 2)  # [B,S,H,D] view
    k = torch.randn(T, B, D, device="cuda", generator=g).bfloat16().transpose(0, 1)  # [B,T,D] view
    w = torch.randn(B, H, S, device="cuda", generator=g).transpose(1, 2)  # [B,S,H] view
    out_base = torch.full((B, T + 3, S), float("nan"), device="cuda")
    out = out_base[:, :T, :].transpose(1, 2)  # strided [B,S,T] output
    indexer_logits(q, k, w, out=out)
    ref = indexer_logits_reference(q, k, w, dtype=torch.float64)
    assert not bool(out.isnan().any())
    assert bool(out_base[:, T:, :].isnan().all()), "wrote outside the output view"
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
    assert _rel_err(out, ref) < REL_TOL, seed


@gpu
def test_logits_random_shapes():
    import random

    rng = random.Random(_seed())
    for _ in range(12):
        B = rng.choice([1, 2, 3])
        S = rng.choice([1, 2, 5, 8, 9, 31, 64, 65, 127, 200])
        T = rng.choice([1, 15, 100, 129, 1000, 2047, 3001])
        H = rng.choice([1, 7, 16, 64])
        D = rng.choice([16, 32, 64, 128])
        kv = [rng.randint(0, T) for _ in range(B)] if rng.random() < 0.3 else None
        _check_logits(B, S, T, H, D, causal=rng.random() < 0.7, kv_lens=kv, scale=rng.choice([1.0, 0.1]))


@gpu
def test_logits_rejects_bad_out_and_inputs():
    q, k, w = _inputs(1, 4, 10, 64, 128)
    with pytest.raises(ValueError):
        indexer_logits(q, k, w, out=torch.empty(1, 4, 11, device="cuda"))
    with pytest.raises(ValueError):
        indexer_logits(q, k, w, out=torch.empty(1, 4, 10, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        indexer_logits(q.float(), k.float(), w)
    with pytest.raises(ValueError):
        indexer_logits(q, k, w, scale=-1.0)


@gpu
def test_is_supported_gpu():
    q, k, w = _inputs(1, 4, 10, 64, 128)
    assert is_supported(q, k, w)
    assert is_supported(q.half(), k.half(), w.bfloat16())
    assert not is_supported(q.float(), k.float(), w)
    assert not is_supported(q, k.half(), w)
    assert not is_supported(q[..., :96], k[..., :96], w)
    assert not is_supported(q, k, w, scale=-0.5)
    assert not is_supported(q.cpu(), k.cpu(), w.cpu())
    assert not is_supported(q, k, w, torch.tensor([3], device="cuda", dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# Top-k
# ----------------------------------------------------------------------------------------------


def _check_topk_against(idx: torch.Tensor, ref_logits: torch.Tensor, topk: int, where: str, *, atol: float):
    """idx selects a valid top-k of ref_logits up to rounding: same count, distinct, same score profile."""
    B, S, T = ref_logits.shape
    kk = min(topk, T)
    assert idx.shape == (B, S, kk) and idx.dtype == torch.int32, where
    assert bool(((idx >= 0) & (idx < T)).all()), f"index out of range: {where}"
    srt = idx.sort(dim=-1).values
    assert not bool((srt[..., 1:] == srt[..., :-1]).any()), f"duplicate indices: {where}"
    got = torch.gather(ref_logits, -1, idx.long()).sort(dim=-1, descending=True).values
    want = torch.topk(ref_logits, kk, dim=-1).values
    # -inf (masked) selections must agree exactly in number; finite scores up to rounding
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"masked-key count differs: {where}"
    fin = torch.isfinite(want)
    assert torch.allclose(got[fin], want[fin], rtol=0, atol=atol), f"selected scores differ: {where}"


@gpu
@pytest.mark.parametrize(
    "B,S,T,topk",
    [(1, 1, 5000, 2048), (16, 1, 3000, 2048), (2, 64, 1000, 2048), (2, 300, 4500, 2048), (1, 512, 8192, 2048),
     (3, 33, 700, 64)],
)
def test_lightning_indexer_topk(B, S, T, topk):
    seed = _seed()
    H, D = 64, 128
    q, k, w = _inputs(B, S, T, H, D, seed=seed)
    idx, logits = lightning_indexer(q, k, w, topk, return_logits=True)
    ref = indexer_logits_reference(q, k, w, dtype=torch.float64)
    where = f"B={B} S={S} T={T} topk={topk} seed={seed}"
    scale = ref[torch.isfinite(ref)].abs().max().item()
    # near-ties may swap between the kernel's fp32 and the fp64 reference: compare score profiles
    _check_topk_against(idx, ref, topk, where, atol=1e-4 * scale)
    # against the kernel's own logits the selection is exact (same values, ties aside)
    _check_topk_against(idx, logits.double(), topk, where, atol=0.0)
    # sorted: scores are non-increasing along the row, masked keys after all visible ones
    vals = torch.gather(logits, -1, idx.long())
    assert bool((vals[..., 1:] <= vals[..., :-1]).all()), where
    # the k-th value agrees with the reference's k-th value up to rounding
    kk = min(topk, T)
    kth, kth_ref = vals[..., kk - 1].double(), torch.topk(ref, kk, dim=-1).values[..., kk - 1]
    both = torch.isfinite(kth_ref)
    assert torch.equal(torch.isneginf(kth), torch.isneginf(kth_ref)), where
    assert torch.allclose(kth[both], kth_ref[both], rtol=0, atol=1e-4 * scale), where
    # overlap with the reference's index set is near-total on random data
    ref_idx = torch.topk(ref, kk, dim=-1).indices
    hit = torch.zeros(B, S, T, dtype=torch.bool, device="cuda").scatter_(-1, ref_idx, True)
    overlap = torch.gather(hit, -1, idx.long()).float().mean().item()
    assert overlap > 0.99, f"overlap {overlap:.4f}: {where}"


@gpu
def test_topk_more_than_visible_and_invalid_index():
    # causal prefill S=T=300 with topk 2048 > T: row s sees s+1 keys, the rest are -inf
    B, S, T, H, D = 2, 300, 300, 64, 128
    q, k, w = _inputs(B, S, T, H, D, seed=_seed())
    idx, logits = lightning_indexer(q, k, w, 2048, return_logits=True)
    assert idx.shape == (B, S, T)
    vals = torch.gather(logits, -1, idx.long())
    n_vis = torch.arange(1, S + 1, device="cuda").view(1, S, 1)
    col = torch.arange(T, device="cuda").view(1, 1, T)
    assert torch.equal(torch.isfinite(vals), (col < n_vis).expand(B, S, T)), "masked keys must come last"
    # the visible entries of row s are keys 0..s
    row = torch.arange(S, device="cuda").view(1, S, 1)
    assert bool(((col >= n_vis) | (idx.long() <= row)).all())
    idx2 = lightning_indexer(q, k, w, 2048, invalid_index=-1)
    assert torch.equal(idx2 == -1, ~(col < n_vis).expand(B, S, T))
    # unsorted: same set
    idx3 = lightning_indexer(q, k, w, 100, sorted=False)
    a = torch.gather(logits, -1, idx3.long()).sort(-1).values
    b = torch.topk(logits, 100, dim=-1).values.sort(-1).values
    assert torch.equal(a, b)


@gpu
def test_indexer_topk_exact_on_given_logits():
    g = torch.Generator(device="cuda").manual_seed(_seed())
    logits = torch.randn(3, 17, 5000, device="cuda", generator=g)
    logits[:, :, 4000:] = float("-inf")
    logits[0, 0, :100] = 1.5  # a block of exact ties
    idx = indexer_topk(logits, 2048)
    got = torch.gather(logits, -1, idx.long())
    assert torch.equal(got, torch.topk(logits, 2048, dim=-1).values)


@gpu
def test_custom_ops_run_the_kernel():
    q, k, w = _inputs(2, 20, 900, 64, 128, seed=_seed())
    a = torch.ops.fx_indexcache.indexer_logits(q, k, w, True, 0.5, None)
    b = indexer_logits(q, k, w, scale=0.5)
    assert torch.equal(a, b)
    i = torch.ops.fx_indexcache.topk_indices(a, 256, True)
    assert i.shape == (2, 20, 256) and i.dtype == torch.int32

    compiled = torch.compile(lambda q, k, w: torch.ops.fx_indexcache.topk_indices(
                                 torch.ops.fx_indexcache.indexer_logits(q, k, w, True, 0.5, None), 256, True),
                             fullgraph=True)
    j = compiled(q, k, w)
    vals_i = torch.gather(b, -1, i.long()).sort(-1).values
    vals_j = torch.gather(b, -1, j.long()).sort(-1).values
    assert torch.equal(vals_i, vals_j)


@gpu
@pytest.mark.parametrize("kind", ["randn", "ties", "masked", "allmasked", "zeros", "wide"])
@pytest.mark.parametrize("R,T,k", [(5, 1, 1), (7, 100, 100), (3, 777, 64), (9, 5000, 2048), (4, 8192, 2048),
                                   (3, 16384, 2048), (2, 32768, 2048), (2, 20000, 7), (2, 4097, 4096)])
def test_row_topk_exact(kind, R, T, k):
    seed = _seed()
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = topk_cases.rows(kind, R, T, g, device="cuda")
    out = torch.full((R, k), -7, dtype=torch.int32, device="cuda")
    tk._launch(x, out, k)
    torch.cuda.synchronize()
    where = f"R={R} T={T} k={k} {kind} seed={seed}"
    assert bool(((out >= 0) & (out < T)).all()), f"unwritten or out of range: {where}"
    srt = out.sort(-1).values
    assert not bool((srt[:, 1:] == srt[:, :-1]).any()), f"duplicates: {where}"
    got = torch.gather(x, 1, out.long())
    want = torch.topk(x, k, dim=-1).values
    assert torch.equal(got.sort(-1, descending=True).values, want), f"values differ: {where}"
    # order: keys above the k-th value in index order, then the lowest-indexed ties
    thr = want[:, -1:]
    n_gt = (got > thr).sum(-1)
    for r in range(R):
        o = out[r].long()
        m = int(n_gt[r])
        assert bool((got[r, :m] > thr[r]).all()) and bool((got[r, m:] == thr[r]).all()), where
        assert torch.equal(o[:m], o[:m].sort().values) and torch.equal(o[m:], o[m:].sort().values), where
        eq_idx = (x[r] == thr[r]).nonzero().flatten()
        assert torch.equal(o[m:], eq_idx[: k - m]), f"tie rule (lowest indices first): {where}"


@gpu
def test_row_topk_sorted_and_dispatch():
    g = torch.Generator(device="cuda").manual_seed(_seed())
    x = torch.randint(-50, 50, (3, 4, 3000), device="cuda", generator=g).float()
    x[..., 2500:] = float("-inf")
    idx = tk.row_topk(x, 2048, sorted=True)
    assert idx.shape == (3, 4, 2048) and idx.dtype == torch.int32
    vals = torch.gather(x, -1, idx.long())
    assert torch.equal(vals, torch.topk(x, 2048, dim=-1).values)
    # stable: equal scores are listed by ascending index
    same = vals[..., 1:] == vals[..., :-1]
    assert bool((~same | (idx[..., 1:] > idx[..., :-1])).all())
    # dispatch: rows over MAX_ROW go to torch.topk; both give the same score profile
    long_rows = torch.randn(2, tk.MAX_ROW + 5, device="cuda", generator=g)
    assert not tk.supported(long_rows, 2048)
    a = torch.gather(long_rows, -1, indexer_topk(long_rows, 2048).long())
    assert torch.equal(a, torch.topk(long_rows, 2048, dim=-1).values)
    short = long_rows[:, : tk.MAX_ROW]
    assert tk.supported(short, 2048)
    b = torch.gather(short, -1, indexer_topk(short, 2048, method="triton").long())
    c = torch.gather(short, -1, indexer_topk(short, 2048, method="torch").long())
    assert torch.equal(b, c)
    u = indexer_topk(short, 2048, sorted=False)  # auto: torch.topk here (4M keys a row), same values
    assert torch.equal(torch.gather(short, -1, u.long()).sort(-1, descending=True).values,
                       torch.topk(short, 2048, dim=-1).values)
    with pytest.raises(ValueError):
        tk.row_topk(long_rows, 2048)
    assert not tk.supported(short.double(), 2048) and not tk.supported(short.cpu(), 2048)


# ----------------------------------------------------------------------------------------------
# CPU-side checks (run everywhere)
# ----------------------------------------------------------------------------------------------


def test_reference_matches_naive_formula_cpu():
    g = torch.Generator().manual_seed(0)
    B, S, T, H, D = 2, 5, 9, 3, 16
    q = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(B, S, H, generator=g, dtype=torch.float64)
    kv = torch.tensor([9, 3])
    got = indexer_logits_reference(q, k, w, scale=0.5, kv_lens=kv, dtype=torch.float64)
    for b in range(B):
        L = int(kv[b])
        for s in range(S):
            for t in range(T):
                vis = t < L and t <= s + L - S
                if not vis:
                    assert got[b, s, t] == float("-inf")
                else:
                    want = sum(float(w[b, s, h]) * max(0.0, 0.5 * float(q[b, s, h] @ k[b, t])) for h in range(H))
                    assert abs(float(got[b, s, t]) - want) < 1e-9


def test_is_supported_false_on_cpu_and_reason():
    q = torch.randn(1, 2, 4, 16).bfloat16()
    k = torch.randn(1, 3, 16).bfloat16()
    w = torch.randn(1, 2, 4)
    assert not is_supported(q, k, w)
    assert "CUDA" in unsupported_reason(q, k, w)
    assert unsupported_reason(q[0], k, w) is not None


def test_custom_ops_fallback_cpu_and_fake():
    q = torch.randn(2, 5, 4, 16).bfloat16()
    k = torch.randn(2, 9, 16).bfloat16()
    w = torch.randn(2, 5, 4)
    kv = torch.tensor([9, 3])
    got = torch.ops.fx_indexcache.indexer_logits(q, k, w, True, 0.5, kv)
    want = indexer_logits_reference(q, k, w, scale=0.5, kv_lens=kv)
    assert torch.equal(got, want)
    logits = torch.ops.fx_indexcache.indexer_logits(q, k, w, True, 1.0, None)
    idx = torch.ops.fx_indexcache.topk_indices(logits, 4, True)
    assert idx.shape == (2, 5, 4) and idx.dtype == torch.int32
    idx = torch.ops.fx_indexcache.topk_indices(logits, 2048, True)
    assert idx.shape == (2, 5, 9)

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fq, fk, fw = torch.empty(2, 5, 4, 16), torch.empty(2, 9, 16), torch.empty(2, 5, 4)
        assert torch.ops.fx_indexcache.indexer_logits(fq, fk, fw, True, 1.0, None).shape == (2, 5, 9)
        fake_logits = torch.ops.fx_indexcache.indexer_logits(fq, fk, fw, True, 1.0, None)
        assert torch.ops.fx_indexcache.topk_indices(fake_logits, 2048, True).shape == (2, 5, 9)
