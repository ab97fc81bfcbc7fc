"""bf16/fp16 indexer scores are fused under the compiler's numerics contract (issue 28; CPU).

Inductor computes a chain of bf16/fp16 ops in fp32 and rounds where it stores a tensor
(``emulate_precision_casts=False``, its default). A score the graph computes in bf16 is therefore fused
as ``indexer_logits_rounded``: fp32 inside, rounded once to the graph's dtype where the graph stores the
score, and the record says which contract a site runs under (``exact``: the graph's own fp32 math;
``fp32_inside``: roundings of intermediates left out). Off CUDA the op runs its fp32 reference and rounds
the same way (the ``kernel_ok`` fixture accepts the sites), so these tests check the contract itself:

* every native layout (the issue's einsum style, matmul in fp16, batched with a bf16 head sum, ...) is
  proven, reported under the right contract and fused; its score is the exact score rounded once, and
  is closer to the float64 score than the model's own eager one;
* ``emulate_precision_casts=True`` (the compiler asked to round as eager does) refuses ``fp32_inside``;
* native stacks under the default IndexCache pass fuse every F layer and equal the contract's oracle;
* top-k sets of the fused path agree with the unfused (Inductor) path as closely as Inductor agrees with
  eager, on the shipped trained checkpoint's indexer inputs and on random data, both levels measured here.
"""

from __future__ import annotations

import pytest
import torch
from capture import GraphCapture
from conftest import CapturingBackend, trace_one_topk
from indexer_layouts import NATIVE_LAYOUTS, exact_score, make_native_inputs

from fx_indexcache.fuse.substitute import FP32_INSIDE, match_indexer_score, substitute_fused_indexer

aten = torch.ops.aten
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _ops(gm, target) -> int:
    return sum(n.target == target for n in gm.graph.nodes)


def _finite_err(x: torch.Tensor, exact: torch.Tensor) -> float:
    fin = torch.isfinite(exact)
    return float((x.double()[fin] - exact[fin]).norm() / exact[fin].norm())


@pytest.mark.parametrize("layout", NATIVE_LAYOUTS, ids=lambda lay: lay.name)
@pytest.mark.parametrize("S", [6, 1], ids=["prefill", "decode"])
def test_native_layout_fuses_under_its_contract(layout, S, kernel_ok):
    args = make_native_inputs(layout, S=S, seed=3 + S)
    gm, topk = trace_one_topk(layout.fn, *args)
    match = match_indexer_score(topk)
    assert not isinstance(match, str), match
    assert match.numerics == layout.numerics
    score_dtype = match.score.meta["val"].dtype
    assert match.score_dtype == score_dtype
    assert match.q.meta["val"].dtype == match.k.meta["val"].dtype == layout.dtype  # rounded q: the cast is the leaf
    (record,) = substitute_fused_indexer(gm.graph, [topk])
    assert record.fused and record.numerics == layout.numerics, record
    assert record.score_dtype == str(score_dtype).removeprefix("torch.")
    assert ("fp32 inside" if layout.numerics == FP32_INSIDE else "exact (") in record.note()
    gm.recompile()
    rounded = torch.ops.fx_indexcache.indexer_logits_rounded.default
    assert _ops(gm, rounded) == (score_dtype != torch.float32)
    assert _ops(gm, torch.ops.fx_indexcache.indexer_logits.default) == (score_dtype == torch.float32)
    assert _ops(gm, aten.relu.default) == 0 and _ops(gm, aten.topk.default) == 0

    got_score, got_idx = gm(*args)
    want_score, _ = layout.fn(*args)
    exact = exact_score(layout, *args[:4])
    assert got_score.dtype == want_score.dtype == score_dtype
    assert torch.equal(torch.isneginf(got_score), torch.isneginf(exact))
    # one rounding of the exact score (fp32 accumulation aside): within half an ulp of the score's dtype
    fin = torch.isfinite(exact)
    u = UNIT_ROUNDOFF.get(score_dtype, 2.0**-24)
    diff = (got_score.double()[fin] - exact[fin]).abs()
    assert bool((diff <= exact[fin].abs() * u * 1.001 + 1e-6).all()), float(diff.max())
    # no further from float64 than the model's own eager score (fp32_inside: strictly closer on this data)
    got_err, eager_err = _finite_err(got_score, exact), _finite_err(want_score, exact)
    assert got_err <= eager_err * 1.001, (got_err, eager_err)
    if layout.numerics == FP32_INSIDE:
        assert got_err < eager_err, (got_err, eager_err)
    # the indices are the top-k of the returned score (widened to fp32 for our top-k: same values)
    picked = torch.gather(got_score, -1, got_idx).float()
    rest = got_score.float().scatter(-1, got_idx, float("-inf"))
    assert bool((picked.min(-1).values >= rest.max(-1).values).all())


def test_emulated_eager_rounding_refuses_fp32_inside_but_not_exact(kernel_ok):
    """With ``emulate_precision_casts=True`` the compiler rounds every bf16 intermediate as eager does: a
    score with such roundings is left to it (the record says why); an fp32 score rounded once still fuses."""
    from torch._inductor import config as inductor_config

    by_name = {lay.name: lay for lay in NATIVE_LAYOUTS}
    with inductor_config.patch(emulate_precision_casts=True):
        for name, fused in (("native_einsum_unbatched_bf16", False), ("fp32_math_rounded_score_bf16", True)):
            layout = by_name[name]
            gm, topk = trace_one_topk(layout.fn, *make_native_inputs(layout))
            before = len(gm.graph.nodes)
            (record,) = substitute_fused_indexer(gm.graph, [topk])
            assert record.fused == fused, record
            if not fused:
                assert "emulate_precision_casts=True" in record.detail and len(gm.graph.nodes) == before


def _stack(kind: str, dtype):
    from indexer_stack import BatchedDSAStack, UnbatchedDSAStack

    torch.manual_seed(0)
    dims = dict(num_layers=4, hidden=64, heads=4, head_dim=16, topk=8)
    if kind == "batched":
        model = BatchedDSAStack(**dims).to(dtype).eval()
        past_k, past_v = model.empty_cache(2, 20, dtype=dtype)
        x = torch.randn(2, 12, 64).to(dtype)
    else:
        model = UnbatchedDSAStack(indexer=kind, **dims).to(dtype).eval()
        past_k, past_v = model.empty_cache(20, dtype=dtype)
        x = torch.randn(12, 64).to(dtype)
    return model, x, past_k, past_v


@pytest.mark.parametrize("kind, dtype", [("native_einsum", torch.bfloat16), ("native_matmul", torch.float16),
                                         ("native_linear_maximum", torch.bfloat16), ("batched", torch.bfloat16)])
def test_native_stack_fuses_every_f_layer_and_equals_the_contract(kind, dtype, kernel_ok, sites_on_cuda):
    """The default pass (IndexCache's default pattern) on a stack written in the model's dtype: the S layers
    are removed, every F layer is fused under ``fp32_inside``, and the stack equals the same weights run
    eagerly with each score computed in fp32 and rounded once (the contract) under the same pattern."""
    model, x, past_k, past_v = _stack(kind, dtype)
    backend = CapturingBackend()
    with torch.no_grad():
        got_x, got_idx = torch.compile(model, backend=backend)(x, past_k, past_v)
    (report,) = backend.reports
    pattern = report.pattern
    f_layers = [i for i, c in enumerate(pattern) if c == "F"]
    assert "S" in pattern and report.indexers_removed == pattern.count("S")
    assert [(r.layer, r.fused, r.numerics, r.score_dtype) for r in report.fusions] == [
        (i, True, FP32_INSIDE, str(dtype).removeprefix("torch.")) for i in f_layers], report.fusions
    if kind == "batched":
        model.set_contract(True)
    else:
        model.set_indexer("contract")
    with torch.no_grad():
        want_x, want_idx = model(x, past_k, past_v, pattern=pattern)
    for got, want in zip(got_idx, want_idx):
        assert torch.equal(got, want)
    torch.testing.assert_close(got_x, want_x, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------- top-k agreement at Inductor's level


def native_scores_topk(q, keys, w, future, k: int):
    """The indexer as a bf16 model writes it (batched): einsum + ReLU, mul + sum head sum, masked_fill."""
    score = (torch.einsum("bshd,btd->bsht", q, keys).relu() * w[..., None]).sum(2)
    return score.masked_fill(future, float("-inf")).topk(k, dim=-1).indices


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the fraction of ``b``'s selected keys that ``a`` selects too."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    hit = torch.zeros(b.shape[0], int(max(a.max(), b.max())) + 1, dtype=torch.bool)
    hit.scatter_(1, b, True)
    return float(torch.gather(hit, 1, a).float().mean())


def topk_agreement_levels(q, keys, w, future, k: int) -> dict:
    """Top-k sets of four paths on the same inputs: eager, Inductor (the unfused path), the fused path (the
    substitution, its op computing and rounding as on CUDA) and float64; returns their agreements."""
    records: list = []

    def fuse(graph):
        records.extend(substitute_fused_indexer(graph, [n for n in graph.nodes if n.target == aten.topk.default]))

    args = (q, keys, w, future, k)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = native_scores_topk(*args)
        inductor = torch.compile(native_scores_topk, backend="inductor", dynamic=False)(*args)
        torch._dynamo.reset()
        fused = torch.compile(native_scores_topk, backend=GraphCapture(fuse), dynamic=False)(*args)
        exact = native_scores_topk(q.double(), keys.double(), w.double(), future, k)
    assert [(r.fused, r.numerics) for r in records] == [(True, FP32_INSIDE)], records
    return {
        "inductor_vs_eager": _agreement(inductor, eager),
        "fused_vs_unfused": _agreement(fused, inductor),
        "fused_vs_eager": _agreement(fused, eager),
        "fused_vs_float64": _agreement(fused, exact),
        "unfused_vs_float64": _agreement(inductor, exact),
    }


def _hold_to_inductor_level(levels: dict) -> None:
    """The fused path may differ from the unfused one about as much as Inductor differs from eager (one bf16
    rounding per head term either way: the product's in the unfused path, the mul's in eager), with room
    for sampling noise; and it is no further from float64 than the unfused path."""
    d_ie, d_fu = 1 - levels["inductor_vs_eager"], 1 - levels["fused_vs_unfused"]
    assert d_ie > 0, levels  # the data exercises the roundings: otherwise the level says nothing
    assert d_fu <= 1.5 * d_ie, levels
    assert levels["fused_vs_float64"] >= levels["unfused_vs_float64"], levels


def test_topk_agreement_on_random_data_is_at_inductor_level(kernel_ok):
    g = torch.Generator().manual_seed(28)
    B, S, T, H, D, K = 1, 128, 4096, 32, 64, 256
    q = torch.randn(B, S, H, D, generator=g).bfloat16()
    keys = torch.randn(B, T, D, generator=g).bfloat16()
    w = (torch.randn(B, S, H, generator=g) * (H**-0.5 * D**-0.5)).bfloat16()
    future = torch.arange(T)[None, :] > torch.arange(S)[:, None] + (T - S)
    _hold_to_inductor_level(topk_agreement_levels(q, keys, w, future, K))


def checkpoint_indexer_inputs(num_queries: int = 256, seq: int = 512):
    """Every indexer's (q, keys, w) of the shipped trained checkpoint run in bf16 on held-out text (2 windows of
    ``seq`` bytes), the last ``num_queries`` queries of each, stacked over layers as the batch."""
    from fx_indexcache.models.reference import corpus
    from fx_indexcache.models.reference.checkpoint import load_checkpoint

    model = load_checkpoint(dtype=torch.bfloat16)
    ids = corpus.windows(corpus.as_tokens(corpus.read_files(corpus.HELD_OUT_FILES)), seq)[:2]
    leaves = []

    def grab(module, args):
        x, q_latent, cos, sin = args[:4]
        B, S, _ = x.shape
        q = module._rope(module.wq_b(q_latent).view(B, S, module.n_heads, module.head_dim), cos, sin)
        keys = module._rope(module.k_norm(module.wk(x)), cos, sin)
        w = module.weights_proj(x) * module.weight_scale
        leaves.append((q[:, -num_queries:], keys, w[:, -num_queries:]))

    hooks = [layer.attn.indexer.register_forward_pre_hook(grab) for layer in model.layers]
    try:
        with torch.no_grad():
            model(ids, None, 0, True)
    finally:
        for hook in hooks:
            hook.remove()
    q, keys, w = (torch.cat(parts).to(torch.bfloat16).contiguous() for parts in zip(*leaves))
    future = torch.arange(seq)[None, :] > torch.arange(num_queries)[:, None] + (seq - num_queries)
    return q, keys, w, future, model.config.index_topk


def test_topk_agreement_on_the_trained_checkpoint_is_at_inductor_level(kernel_ok):
    q, keys, w, future, k = checkpoint_indexer_inputs()
    assert q.shape[0] >= 16 and q.shape[-2:] == (8, 32)  # 8+ layers x 2 windows, the checkpoint's 8 x 32 indexer
    _hold_to_inductor_level(topk_agreement_levels(q, keys, w, future, k))
