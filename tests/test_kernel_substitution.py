"""``substitute_fused_indexer``: matching the indexer score in ATen graphs and swapping in the fused op.

CPU only (GPU checks: tests/gpu/test_kernel_substitution_gpu.py). Off CUDA the kernel is unsupported,
so the real path leaves every site with a record saying so; the ``kernel_ok`` fixture (conftest) replaces the
support check (``fuse.substitute.kernel_refusal``) so the substitution is made anyway, and the op
then runs its fp32 reference: the rewritten graph must give the same logits and the same top-k as
the original. Graphs: the AOT forward graph of the tiny reference model and of the tiny transformers
DeepSeek-V3.2 (prefill and decode with the cache), ``make_fx`` graphs of DSA indexers written in other
layouts (tests/test_indexer_layouts.py has the zoo), synthetic graphs for the shapes that must be
refused, and one Inductor post-grad graph (slow).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from capture import GraphCapture
from conftest import trace_one_topk

from fx_indexcache import IndexCacheConfig, IndexCachePass, detect
from fx_indexcache.fuse.substitute import match_indexer_score, substitute_fused_indexer
from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel


def _fused_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if "indexer_logits" in str(n.target)]


class _Backend(GraphCapture):
    """AOT forward graph, optional IndexCache rewrite, then the substitution; runs the graph eagerly."""

    def __init__(self, pattern: str | None = None, substitute: bool = True) -> None:
        super().__init__(self._rewrite)
        self.substitute = substitute
        self.index_cache = IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern)) if pattern else None
        self.records: list = []
        self.matches: list = []

    def _rewrite(self, graph) -> None:
        if self.index_cache is not None:
            self.index_cache.run(graph)
        sites = detect(graph).sites
        self.matches += [(site.layer, match_indexer_score(site)) for site in sites]
        if self.substitute:
            self.records += substitute_fused_indexer(graph, sites)


TINY = DSAModelConfig.tiny(num_layers=3, first_k_dense_layers=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_model_every_site_matched_and_forced_substitution_is_exact(dtype, kernel_ok):
    model = ReferenceDSAModel(TINY, seed=0, dtype=dtype)
    backend = _Backend()
    ids = torch.randint(0, TINY.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits, want_idx = model(ids, None, 0, True)
        got_logits, got_idx = torch.compile(model, backend=backend)(ids, None, 0, True)
    assert len(backend.matches) == TINY.num_layers
    for layer, match in backend.matches:
        assert not isinstance(match, str), match
        assert (match.q_roles, match.k_roles, match.w_roles) == (tuple("bshd"), tuple("btd"), tuple("bsh"))
        q, k, w = (m.meta["val"] for m in (match.q, match.k, match.w))
        # the kernel's q and k are the model-dtype tensors ahead of the .float() casts
        assert q.dtype == k.dtype == dtype
        assert tuple(q.shape) == (2, 20, TINY.index_n_heads, TINY.index_head_dim)
        assert tuple(k.shape) == (2, 20, TINY.index_head_dim)
        assert tuple(w.shape) == (2, 20, TINY.index_n_heads) and w.dtype == dtype  # ahead of .float() too
        # the fp32 weight scale is folded into the kernel's scale (the w leaf is the unscaled projection)
        assert match.scale == pytest.approx(TINY.index_n_heads**-0.5 * TINY.index_head_dim**-0.5)
    assert [r.layer for r in backend.records] == list(range(TINY.num_layers))
    assert all(r.fused and "fused indexer_logits" in r.note() for r in backend.records), backend.records
    (gm,) = backend.graphs
    assert len(_fused_nodes(gm)) == TINY.num_layers
    assert not [n for n in gm.graph.nodes if n.target == torch.ops.aten.relu.default]
    for got, want in zip(got_idx, want_idx):
        assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)


def test_reference_model_decode_with_cache_and_index_cache_pattern(kernel_ok):
    """IndexCache "FSF" first: only the two F layers keep a score to swap; prefill + one decode step."""
    model = ReferenceDSAModel(TINY, seed=0)
    oracle = ReferenceDSAModel(TINY, seed=0)
    oracle.set_index_cache_pattern("FSF")
    backend = _Backend(pattern="FSF")
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, TINY.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    step = torch.randint(0, TINY.vocab_size, (1, 1), generator=torch.Generator().manual_seed(2))
    cache, ref_cache = model.new_cache(1, max_seq_len=64), oracle.new_cache(1, max_seq_len=64)
    with torch.no_grad():
        for tokens, pos in ((ids, 0), (step, 24)):
            got_logits, got_idx = compiled(tokens, cache, pos, True)
            want_logits, want_idx = oracle(tokens, ref_cache, pos, True)
            for got, want in zip(got_idx, want_idx):
                assert torch.equal(got, want)
            torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    fused = [r for r in backend.records if r.fused]
    assert len(fused) == 2 * len(backend.graphs) and {r.layer for r in fused} == {0, 2}
    assert any("(1, 1, " in r.detail for r in fused)  # q of one query (decode graph)


def _pass_twice_backend(pattern: str, reports: list):
    """AOT forward graph; the IndexCache pass (which fuses) applied twice, as an export rewritten and then
    compiled would see it; the graph then runs eagerly."""

    def rewrite(graph) -> None:
        for _ in range(2):
            reports.append(IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern),
                                          graph_starts_at_first_layer=True).run(graph))

    return GraphCapture(rewrite)


def test_the_pass_keeps_fusion_records_and_a_second_application_changes_nothing(kernel_ok, sites_on_cuda):
    """The report carries the substitution's records; a second pass over the fused graph (whose F layers no
    longer hold an aten.topk) neither fuses nor removes anything, and the result stays the FSF oracle's."""
    model, oracle = ReferenceDSAModel(TINY, seed=0), ReferenceDSAModel(TINY, seed=0)
    oracle.set_index_cache_pattern("FSF")
    ids = torch.randint(0, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    reports: list = []
    with torch.no_grad():
        got_logits, got_idx = torch.compile(model, backend=_pass_twice_backend("FSF", reports))(ids, None, 0, True)
        want_logits, want_idx = oracle(ids, None, 0, True)
    first, second = reports
    assert first.pattern == "FSF" and first.indexers_fused == 2
    assert [r.layer for r in first.fusions if r.fused] == [0, 2]
    assert "layer 0: fused indexer_logits" in first.format()
    assert second.indexers_removed == 0 and second.indexers_fused == 0
    for got, want in zip(got_idx, want_idx):
        assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)


def test_cpu_sites_are_left_with_a_note():
    model = ReferenceDSAModel(TINY, seed=0, dtype=torch.bfloat16)
    backend = _Backend()
    ids = torch.randint(0, TINY.vocab_size, (1, 12))
    with torch.no_grad():
        torch.compile(model, backend=backend)(ids)
    assert len(backend.records) == TINY.num_layers
    assert all(not r.fused and "CUDA" in r.detail and "left as is" in r.note() for r in backend.records), backend.records
    (gm,) = backend.graphs
    assert not _fused_nodes(gm)


def test_transformers_v32_matched_and_forced_substitution_is_exact(kernel_ok):
    pytest.importorskip("transformers")
    import hf_oracle as H

    try:
        tiny = H.TINY_DSA_MODELS["deepseek_v32"]()
    except Exception as e:  # transformers without DeepSeek-V3.2
        pytest.skip(f"no DeepseekV32 in this transformers: {e}")
    want = H.prefill_and_decode(tiny.model, tiny, 12, 1)
    backend = _Backend()
    got = H.prefill_and_decode(torch.compile(tiny.model, backend=backend), tiny, 12, 1)
    n = len(tiny.dsa_layers)
    assert len(backend.matches) == 2 * n  # prefill graph + decode graph
    for _, match in backend.matches:
        assert not isinstance(match, str), match
        # softmax_scale before the ReLU times the fp32 n_heads**-0.5 on the weights
        cfg = tiny.config
        assert match.scale == pytest.approx(cfg.index_head_dim**-0.5 * cfg.index_n_heads**-0.5)
        assert "".join(match.k_roles).replace("1", "") in ("td", "btd")
    assert sum(r.fused for r in backend.records) == 2 * n
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---- synthetic graphs: what must match (other layouts) and what must be refused ----------------


def _inputs(B=2, S=8, T=8, H=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g), torch.randn(B, T, D, generator=g), torch.rand(B, S, H, generator=g))


def test_head_major_q_and_additive_mask_get_a_permute(kernel_ok):
    """q laid out [B, H, S, D], a matmul form with a scale before the ReLU and an additive mask."""

    def fn(q_bhsd, k, w, mask):
        s = torch.matmul(q_bhsd.unsqueeze(2).float(), k.transpose(1, 2).float()[:, None, None]).squeeze(2)
        s = F.relu(s * 0.25)  # [B, H, S, T]
        score = (s * w.permute(0, 2, 1).unsqueeze(-1)).sum(1) + mask
        return score.topk(3, dim=-1).indices

    q, k, w = _inputs()
    args = (q.permute(0, 2, 1, 3).contiguous(), k, w, torch.randn(8, 8))
    gm, topk = trace_one_topk(fn, *args)
    match = match_indexer_score(topk)
    assert not isinstance(match, str), match
    assert match.q_roles == tuple("bhsd") and match.scale == 0.25
    (record,) = substitute_fused_indexer(gm.graph, [topk])
    assert record.fused, record
    gm.recompile()
    assert any(n.target == torch.ops.aten.permute.default for n in gm.graph.nodes)
    assert torch.equal(gm(*args), fn(*args))


def _sorts(gm) -> list:
    return [n for n in gm.graph.nodes if n.target in (torch.ops.aten.sort.default, torch.ops.aten.sort.stable)]


@pytest.mark.parametrize("stable", [False, True])
def test_sort_cut_site_is_fused_and_its_sort_becomes_a_top_k(stable, kernel_ok):
    """An indexer whose selection is a descending sort cut to k keys (detection's aten.sort site): its score
    becomes the fused op and the sort + cut our sorted top-k, the same keys in the same order."""
    def fn(q, k, w):
        score = torch.einsum("bsh,bsht->bst", w, F.relu(torch.einsum("bshd,btd->bsht", q, k)))
        return torch.sort(score, dim=-1, descending=True, stable=stable).indices[..., :3]

    args = _inputs()
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn, tracing_mode="fake")(*args)
    (site,) = _sorts(gm)
    (record,) = substitute_fused_indexer(gm.graph, [site], score_and_topk=True)
    assert record.fused and "topk_indices" in record.detail and "sort cut to k" in record.detail, record
    gm.recompile()
    assert not _sorts(gm)
    assert _fused_nodes(gm)
    assert torch.equal(gm(*args), fn(*args))


@pytest.mark.parametrize("backend", ["inductor", "eager"])
def test_sort_cut_stack_is_shared_and_fused_end_to_end(backend, sites_on_cuda, kernel_ok):
    """A DSA stack that selects by sort + cut, compiled with the backend: S layers share, both F layers run the
    fused score and our top-k (no sort left in the graph that runs), and the output is the hand-written model's."""
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    import fx_indexcache as fic
    from indexer_stack import UnbatchedDSAStack

    torch.manual_seed(0)
    model = UnbatchedDSAStack(num_layers=4, hidden=64, heads=4, head_dim=16, topk=8, select="sort").eval()
    past_k, past_v = model.empty_cache(40, "cpu", torch.float32)
    x = torch.randn(8, 64)
    chosen = fic.indexcache_backend if backend == "inductor" else fic.indexcache_eager_backend
    compiled = torch.compile(model, backend=chosen, dynamic=False)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        out, idx = compiled(x, past_k, past_v)
        with profile() as prof:
            compiled(x, past_k, past_v)
        want, want_idx = model(x, past_k, past_v, pattern="FFSS")
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("fx_indexcache::indexer_logits") == 2 and calls.get("fx_indexcache::topk_indices") == 2, calls
    assert not any("sort" in key for key in calls), calls
    assert counters["fx_indexcache"]["indexers_fused"] == 2 and counters["fx_indexcache"]["indexers_removed"] == 2
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    # the same visible keys in every row; the masked (-inf) ones are ties that either op may pick in any order
    visible = lambda i: torch.where(i <= torch.arange(8)[:, None] + 40, i, -1).sort(-1).values  # noqa: E731
    assert all(torch.equal(visible(a), visible(b)) for a, b in zip(idx, want_idx))


def test_sort_cut_over_another_dim_keeps_its_sort(kernel_ok):
    """A sort over the query axis of a transposed score is scored by the fused op but keeps its sort, and says so."""

    def fn(q, k, w):
        score = torch.einsum("bsh,bsht->bst", w, F.relu(torch.einsum("bshd,btd->bsht", q, k)))
        return score.transpose(1, 2).sort(1, descending=True).indices[:, :3]

    args = _inputs()
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn, tracing_mode="fake")(*args)
    (site,) = _sorts(gm)
    (record,) = substitute_fused_indexer(gm.graph, [site])
    assert record.fused and "selection kept as aten.sort" in record.detail, record
    gm.recompile()
    assert torch.equal(gm(*args), fn(*args))


@pytest.mark.parametrize(
    "kind, expect",
    [
        ("weights_indexed_by_keys", "of w plays no role"),
        ("negative_scale", "non-negative"),
        ("cast_to_fp8", "casts"),
        ("no_relu", "ReLU"),
        ("q_broadcast_over_heads", "broadcast"),
        ("weights_broadcast_over_queries", "broadcast"),
        ("relu_after_head_sum", "head-weighted"),
    ],
)
def test_other_scores_are_left_alone(kind, expect, kernel_ok):
    def fn(q, k, w):
        qk = torch.einsum("bshd,btd->bsht", q, k)
        if kind == "weights_indexed_by_keys":  # w[b, t, h]: not a per-query head weight
            score = torch.einsum("bth,bsht->bst", w, F.relu(qk))
        elif kind == "negative_scale":
            score = torch.einsum("bsh,bsht->bst", w, F.relu(qk * -0.5))
        elif kind == "cast_to_fp8":  # e4m3 rounding between the product and the ReLU: no compiler elides it
            score = torch.einsum("bsh,bsht->bst", w, F.relu(qk.to(torch.float8_e4m3fn).float()))
        elif kind == "no_relu":
            score = torch.einsum("bsh,bsht->bst", w, qk.sigmoid())
        elif kind == "q_broadcast_over_heads":
            qk = torch.einsum("bsd,btd->bst", q[:, :, 0], k)[:, :, None].expand(-1, -1, q.shape[2], -1)
            score = torch.einsum("bsh,bsht->bst", w, F.relu(qk))
        elif kind == "weights_broadcast_over_queries":
            score = torch.einsum("bh,bsht->bst", w[:, 0], F.relu(qk))
        else:  # relu_after_head_sum
            score = F.relu(torch.einsum("bsh,bsht->bst", w, qk))
        return score.topk(3, dim=-1).indices

    args = _inputs()
    gm, topk = trace_one_topk(fn, *args)
    match = match_indexer_score(topk)
    assert isinstance(match, str) and expect in match, match
    before = len(gm.graph.nodes)
    (record,) = substitute_fused_indexer(gm.graph, [topk])
    assert not record.fused and expect in record.detail and len(gm.graph.nodes) == before


def test_roles_are_proven_not_assumed(kernel_ok):
    """Summing over the queries instead of the heads is the same function with s and h swapped:
    the labels find that reading (q viewed [B, H, S, D]) and the swap stays exact."""

    def fn(q, k, w):
        score = torch.einsum("bsh,bsht->bht", w, F.relu(torch.einsum("bshd,btd->bsht", q, k)))
        return score.topk(3, dim=-1).indices

    args = _inputs(H=8)
    gm, topk = trace_one_topk(fn, *args)
    match = match_indexer_score(topk)
    assert not isinstance(match, str) and match.q_roles == tuple("bhsd"), match
    assert substitute_fused_indexer(gm.graph, [topk])[0].fused
    gm.recompile()
    assert torch.equal(gm(*args), fn(*args))


def test_decode_shapes_one_query_match(kernel_ok):
    def fn(q, k, w):
        score = torch.einsum("bsh,bsht->bst", w, F.relu(torch.einsum("bshd,btd->bsht", q, k)))
        return score.topk(3, dim=-1).indices

    args = _inputs(B=1, S=1, T=40, H=8, D=32)
    gm, topk = trace_one_topk(fn, *args)
    match = match_indexer_score(topk)
    assert not isinstance(match, str), match
    assert substitute_fused_indexer(gm.graph, [topk])[0].fused
    gm.recompile()
    assert _fused_nodes(gm)
    assert torch.equal(gm(*args), fn(*args))


@pytest.mark.slow  # one Inductor compile on CPU: ~1 min on 2 busy cores
def test_inductor_post_grad_graph_forced_substitution(kernel_ok):
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Capture(CustomGraphPass):
        records: list = []

        def __call__(self, graph):
            self.records += substitute_fused_indexer(graph, detect(graph).sites)

        def uuid(self):
            return None

    cfg = DSAModelConfig.tiny(num_layers=2, first_k_dense_layers=2)
    model = ReferenceDSAModel(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    graph_pass = Capture()
    with torch.no_grad():
        want_logits, want_idx = model(ids, None, 0, True)
        opts = {"post_grad_custom_post_pass": graph_pass, "fx_graph_cache": False}
        got_logits, got_idx = torch.compile(model, backend="inductor", options=opts)(ids, None, 0, True)
    assert len(graph_pass.records) == 2 and all(r.fused for r in graph_pass.records), graph_pass.records
    for got, want in zip(got_idx, want_idx):
        assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)


# ---- one ReLU for detection and fusion ----------------------------------------------------------
_ACTIVATIONS = {
    "relu": (F.relu, True),
    "clamp_min(0)": (lambda s: torch.clamp_min(s, 0), True),
    "clamp(min=0)": (lambda s: torch.clamp(s, min=0), True),
    "clamp(min=0, max=6)": (lambda s: torch.clamp(s, min=0, max=6), False),  # ReLU6: another activation
    "clamp_min(0.5)": (lambda s: torch.clamp_min(s, 0.5), False),
    "maximum(s, zeros_like)": (lambda s: torch.maximum(s, torch.zeros_like(s)), True),
    "maximum(scalar zero, s)": (lambda s: torch.maximum(s.new_zeros(()), s), True),
    "maximum(s, full 0)": (lambda s: torch.maximum(s, torch.full((s.shape[-1],), 0.0)), True),
    "maximum(s, full 0.5)": (lambda s: torch.maximum(s, torch.full_like(s, 0.5)), False),
    "maximum(s, 0-dim zero float64)": (lambda s: torch.maximum(s, torch.zeros((), dtype=torch.float64)), True),
    "maximum(s, zeros float64)": (lambda s: torch.maximum(s, torch.zeros(s.shape[-1], dtype=torch.float64)), False),
    "maximum(s, zeros of a wider shape)": (lambda s: torch.maximum(s, torch.zeros((2, *s.shape))), False),
    "maximum(s, s)": (lambda s: torch.maximum(s, s.flip(-1)), False),
    "maximum(s, tensor(0.))": (lambda s: torch.maximum(s, torch.tensor(0.0)), True),  # a constant of the graph
    "maximum(s, tensor([0., 1., 0., ...]))": (lambda s: torch.maximum(s, torch.tensor([0.0, 1.0] + [0.0] * 6)), False),
    # a select between s and zero by s's sign (one class however it is spelt); other selects are not a ReLU
    "where(s > 0, s, 0)": (lambda s: torch.where(s > 0, s, 0.0), True),
    "where(s >= 0, s, zeros_like)": (lambda s: torch.where(s >= 0, s, torch.zeros_like(s)), True),
    "where(s < 0, 0, s)": (lambda s: torch.where(s < 0, 0.0, s), True),
    "where(0 >= s, 0, s)": (lambda s: torch.where(torch.zeros_like(s) >= s, 0.0, s), True),
    "where(s > 0, 0, s)": (lambda s: torch.where(s > 0, 0.0, s), False),  # the negative part
    "where(s > 0.5, s, 0)": (lambda s: torch.where(s > 0.5, s, 0.0), False),
    "where(s > 0, s, 1)": (lambda s: torch.where(s > 0, s, 1.0), False),
    "where(flip(s) > 0, s, 0)": (lambda s: torch.where(s.flip(-1) > 0, s, 0.0), False),
    "where(s > 0, s, zeros of a wider shape)": (lambda s: torch.where(s > 0, s, torch.zeros((2, *s.shape))), False),
    "s * (s > 0)": (lambda s: s * (s > 0), True),
    "(s >= 0).float() * s": (lambda s: (s >= 0).float() * s, True),
    "s * (s < 0)": (lambda s: s * (s < 0), False),
    "s.masked_fill(s < 0, 0)": (lambda s: s.masked_fill(s < 0, 0.0), True),
    "s.masked_fill(s > 0, 0)": (lambda s: s.masked_fill(s > 0, 0.0), False),
    "s.masked_fill(s < 0, -1)": (lambda s: s.masked_fill(s < 0, -1.0), False),
    "threshold(s, 0, 0)": (lambda s: F.threshold(s, 0.0, 0.0), True),
    "threshold(s, 0.1, 0)": (lambda s: F.threshold(s, 0.1, 0.0), False),
}


class _ActivatedIndexer(torch.nn.Module):
    """A batched indexer whose ReLU is spelled ``activation``: q, k and w projected from x."""

    def __init__(self, activation) -> None:
        super().__init__()
        self.activation = activation
        self.wq, self.wk, self.ww = (torch.nn.Linear(16, n, bias=False) for n in (4 * 16, 16, 4))

    def forward(self, x):
        q = self.wq(x).unflatten(-1, (4, 16))
        s = self.activation(torch.einsum("bshd,btd->bsht", q, self.wk(x)))
        return (s * self.ww(x).unsqueeze(-1)).sum(2).topk(3, dim=-1).indices


@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_detection_and_fusion_agree_on_what_a_relu_is(name, kernel_ok):
    """clamp(min=0), the maximum with a tensor of zeros and a select of s or zero by s's sign are a ReLU for the
    detector and for the fusion matcher alike; with a max, another floor, another branch or predicate, or zeros
    that widen the shape or the dtype they are not."""
    activation, is_relu = _ACTIVATIONS[name]
    model = _ActivatedIndexer(activation)
    backend = GraphCapture(lambda graph: detect(graph, True).sites)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(torch.compile(model, backend=backend)(x), model(x))
    (sites,) = backend.results
    (gm,) = backend.graphs
    assert len(sites) == int(is_relu) and backend.count_after(torch.ops.aten.topk.default) == [1]
    match = match_indexer_score(sites[0] if sites else next(n for n in gm.graph.nodes if n.target == torch.ops.aten.topk.default))
    assert isinstance(match, str) != is_relu, match
    if is_relu:  # the fused op replaces the whole activation, a select's sign test included
        (record,) = substitute_fused_indexer(gm.graph, sites)
        assert record.fused, record
        sign_tests = {getattr(torch.ops.aten, op) for op in ("gt", "ge", "lt", "le", "where", "threshold")}
        assert not any(getattr(n.target, "_overloadpacket", None) in sign_tests for n in gm.graph.nodes)


def test_a_fused_site_that_falls_back_at_run_time_says_so(caplog):
    """The op's run-time check can refuse what the compile-time check let through (session 9 saw an F layer
    run the fp32 reference on an H200): that fallback on CUDA inputs is counted and logged once per reason."""
    import logging

    from torch._dynamo.utils import counters

    from fx_indexcache.fuse.kernels import lightning_indexer as li

    li._warn_fallback.cache_clear()
    before = counters["fx_indexcache"]["fused_op_reference_fallbacks"]
    with caplog.at_level(logging.WARNING, logger=li.__name__):
        for _ in range(3):
            li._warn_fallback("q and k must both be bf16 or fp16", "q torch.float32 (1, 8, 4, 16)")
    assert counters["fx_indexcache"]["fused_op_reference_fallbacks"] - before == 1
    assert [r.getMessage() for r in caplog.records].count(
        "fx_indexcache::indexer_logits runs its reference (fp32 einsum, slow) on CUDA inputs: q and k must both be bf16 "
        "or fp16 (q torch.float32 (1, 8, 4, 16))") == 1
