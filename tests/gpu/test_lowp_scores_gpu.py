"""bf16/fp16 indexer scores on the GPU (issue 28): the rounded op, Inductor-compiled native layouts and stacks.

* ``indexer_logits_rounded`` equals ``indexer_logits(...).to(dtype)`` bit for bit (the kernel's store rounds
  to nearest even, as ``Tensor.to``), prefill and decode, bf16 and fp16;
* every native layout, compiled by Inductor with the substitution as its post-grad pass, is fused under its
  contract and the generated code calls the rounded op;
* the default ``indexcache_backend`` fuses every F layer of native bf16/fp16 stacks;
* top-k sets of the fused path agree with the unfused Inductor path as closely as Inductor agrees with eager
  (both measured here), at V3.2 indexer dims on random data and on the trained checkpoint's indexer inputs.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_marks import needs_gpu  # noqa: E402

from fx_indexcache.fuse.substitute import FP32_INSIDE, substitute_fused_indexer  # noqa: E402

pytestmark = needs_gpu

aten = torch.ops.aten


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S, T", [(300, 1000), (1, 4099), (5, 777)])
def test_rounded_op_is_the_fp32_logits_rounded(dtype, S, T):
    from fx_indexcache.fuse.kernels import lightning_indexer as li

    g = torch.Generator("cuda").manual_seed(S * 7 + T)
    q = torch.randn(2, S, 16, 64, device="cuda", generator=g).to(dtype)
    k = torch.randn(2, T, 64, device="cuda", generator=g).to(dtype)
    w = torch.randn(2, S, 16, device="cuda", generator=g) * 0.3
    for causal in (False, True):
        full = torch.ops.fx_indexcache.indexer_logits(q, k, w, causal, 0.125, None)
        got = torch.ops.fx_indexcache.indexer_logits_rounded(q, k, w, causal, 0.125, None, dtype)
        assert got.dtype == dtype and got.shape == full.shape
        assert torch.equal(got, full.to(dtype))  # bit for bit, -inf included
        assert li.unsupported_reason(q, k, w) is None  # the kernel ran, not the reference


@pytest.mark.parametrize("S, T", [(1, 32768), (64, 8192)], ids=["decode", "prefill"])
def test_rounded_op_and_widened_topk_replay_in_a_cuda_graph(S, T):
    """The fused path of a bf16 score (rounded logits, then our top-k on them widened to fp32) captured once
    and replayed on new inputs: the replayed score is the fp32 logits rounded, the indices its top-k."""
    dtype, K, scale = torch.bfloat16, 2048, 128**-0.5
    q = torch.empty(1, S, 64, 128, device="cuda", dtype=dtype)
    k = torch.empty(1, T, 128, device="cuda", dtype=dtype)
    w = torch.empty(1, S, 64, device="cuda")

    def fill(seed: int) -> None:
        g = torch.Generator("cuda").manual_seed(seed)
        q.copy_(torch.randn(q.shape, device="cuda", generator=g))
        k.copy_(torch.randn(k.shape, device="cuda", generator=g))
        w.copy_(torch.randn(w.shape, device="cuda", generator=g) * 0.125)

    def step():
        score = torch.ops.fx_indexcache.indexer_logits_rounded(q, k, w, True, scale, None, dtype)
        return score, torch.ops.fx_indexcache.topk_indices(score.float(), K, False)

    fill(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        score_g, idx_g = step()
    for seed in (1, 2):
        fill(seed)
        graph.replay()
        torch.cuda.synchronize()
        want = torch.ops.fx_indexcache.indexer_logits(q, k, w, True, scale, None).to(dtype)
        assert torch.equal(score_g, want)
        picked = torch.gather(score_g.float(), -1, idx_g.long())
        rest = score_g.float().scatter(-1, idx_g.long(), float("-inf"))
        assert bool((picked.min(-1).values >= rest.max(-1).values).all())
        assert bool(torch.isfinite(picked).all())  # every query sees >= K keys: no masked key is picked


class _Fuse(CustomGraphPass):
    def __init__(self, substitute: bool) -> None:
        self.substitute, self.records = substitute, []

    def __call__(self, graph) -> None:
        if self.substitute:
            self.records += substitute_fused_indexer(graph, [n for n in graph.nodes if n.target == aten.topk.default])

    def uuid(self):
        return None


def _inductor(fn, substitute: bool):
    graph_pass = _Fuse(substitute)
    opts = {"post_grad_custom_post_pass": graph_pass, "fx_graph_cache": False}
    return torch.compile(fn, backend="inductor", options=opts, dynamic=False), graph_pass


def test_native_layouts_fuse_under_inductor():
    from indexer_layouts import NATIVE_LAYOUTS, exact_score, make_native_inputs

    for layout in NATIVE_LAYOUTS:
        torch._dynamo.reset()
        args = make_native_inputs(layout, S=40, T=300, T_max=320, H=8, D=64, topk=16, device="cuda", seed=1)
        compiled, graph_pass = _inductor(layout.fn, True)
        (score, idx), code = run_and_get_code(compiled, *args)
        (record,) = graph_pass.records
        assert record.fused and record.numerics == layout.numerics, (layout.name, record)
        narrow = score.dtype != torch.float32
        assert any(("indexer_logits_rounded" if narrow else "indexer_logits") in src for src in code), layout.name
        exact = exact_score(layout, *args[:4])
        fin = torch.isfinite(exact)
        assert torch.equal(torch.isneginf(score), torch.isneginf(exact)), layout.name
        u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(score.dtype, 2.0**-20)
        diff = (score.double()[fin] - exact[fin]).abs()
        assert bool((diff <= exact[fin].abs() * u * 1.001 + 1e-5).all()), (layout.name, float(diff.max()))


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1, a.shape[-1]).long(), b.reshape(-1, b.shape[-1]).long()
    hit = torch.zeros(b.shape[0], int(max(a.max(), b.max())) + 1, dtype=torch.bool, device=a.device)
    hit.scatter_(1, b, True)
    return float(torch.gather(hit, 1, a).float().mean())


def _levels(q, keys, w, future, k) -> dict:
    from test_lowp_scores import native_scores_topk

    args = (q, keys, w, future, k)
    with torch.no_grad():
        eager = native_scores_topk(*args)
        torch._dynamo.reset()
        unfused = _inductor(native_scores_topk, False)[0](*args)
        torch._dynamo.reset()
        compiled, graph_pass = _inductor(native_scores_topk, True)
        fused = compiled(*args)
        exact = native_scores_topk(q.double(), keys.double(), w.double(), future, k)
    assert [(r.fused, r.numerics) for r in graph_pass.records] == [(True, FP32_INSIDE)], graph_pass.records
    levels = {"inductor_vs_eager": _agreement(unfused, eager), "fused_vs_unfused": _agreement(fused, unfused),
              "fused_vs_float64": _agreement(fused, exact), "unfused_vs_float64": _agreement(unfused, exact)}
    print(levels)
    return levels


def _hold(levels: dict) -> None:
    d_ie, d_fu = 1 - levels["inductor_vs_eager"], 1 - levels["fused_vs_unfused"]
    assert d_ie > 0, levels
    assert d_fu <= 1.5 * d_ie, levels
    assert levels["fused_vs_float64"] >= levels["unfused_vs_float64"], levels


def test_topk_agreement_at_v32_dims_is_at_inductor_level():
    g = torch.Generator("cuda").manual_seed(28)
    B, S, T, H, D, K = 1, 512, 8192, 64, 128, 2048
    q = torch.randn(B, S, H, D, device="cuda", generator=g).bfloat16()
    keys = torch.randn(B, T, D, device="cuda", generator=g).bfloat16()
    w = (torch.randn(B, S, H, device="cuda", generator=g) * (H**-0.5 * D**-0.5)).bfloat16()
    future = torch.arange(T, device="cuda")[None, :] > torch.arange(S, device="cuda")[:, None] + (T - S)
    _hold(_levels(q, keys, w, future, K))


def test_topk_agreement_on_the_trained_checkpoint_is_at_inductor_level():
    from test_lowp_scores import checkpoint_indexer_inputs

    q, keys, w, future, k = (t.cuda() if isinstance(t, torch.Tensor) else t for t in checkpoint_indexer_inputs())
    _hold(_levels(q, keys, w, future, k))


@pytest.mark.parametrize("kind, dtype", [("native_einsum", torch.bfloat16), ("native_matmul", torch.float16),
                                         ("native_linear_maximum", torch.bfloat16), ("batched", torch.bfloat16),
                                         ("native_einsum+sort", torch.bfloat16)])
def test_backend_default_fuses_every_f_layer_of_a_native_stack(kind, dtype):
    import fx_indexcache
    from fx_indexcache import indexcache_backend
    from indexer_stack import BatchedDSAStack, UnbatchedDSAStack

    torch.manual_seed(0)
    dims = dict(num_layers=4, hidden=256, heads=16, head_dim=64, topk=64)
    if kind == "batched":
        model = BatchedDSAStack(**dims).to(device="cuda", dtype=dtype).eval()
        past_k, past_v = model.empty_cache(2, 500, "cuda", dtype)
        x = torch.randn(2, 100, 256, device="cuda").to(dtype)
    else:
        indexer, _, select = kind.partition("+")  # "+sort": keys picked by a descending sort cut to k
        model = UnbatchedDSAStack(indexer=indexer, select=select or "topk", **dims).to(device="cuda", dtype=dtype).eval()
        past_k, past_v = model.empty_cache(500, "cuda", dtype)
        x = torch.randn(100, 256, device="cuda").to(dtype)
    torch._dynamo.reset()
    fx_indexcache.clear_reports()
    with torch.no_grad():
        compiled = torch.compile(model, backend=indexcache_backend, options={"fx_graph_cache": False}, dynamic=False)
        (got_x, got_idx), code = run_and_get_code(compiled, x, past_k, past_v)
        (report,) = fx_indexcache.reports()
        want_x, want_idx = model(x, past_k, past_v, pattern=report.pattern)
    f_layers = [i for i, c in enumerate(report.pattern) if c == "F"]
    assert [(r.layer, r.fused, r.numerics) for r in report.fusions] == [(i, True, FP32_INSIDE) for i in f_layers]
    assert any("indexer_logits_rounded" in src for src in code)
    if kind.endswith("+sort"):  # the sort + cut became our top-k
        assert all("topk_indices" in r.detail for r in report.fusions), [r.detail for r in report.fusions]
    for layer in f_layers:  # against the eager model (its own bf16 roundings): near-ties only
        assert _agreement(got_idx[layer], want_idx[layer]) > 0.97
    rel = (got_x.double() - want_x.double()).norm() / want_x.double().norm()
    assert rel < 3e-2, rel
