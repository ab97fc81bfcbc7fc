"""The matcher proves and fuses the indexer score however it is written (CPU; the op's reference path).

Each layout of ``indexer_layouts.LAYOUTS`` is traced to an ATen graph (``make_fx``), matched, and
substituted with the support check replaced (off CUDA the op runs its fp32 reference); the rewritten
graph must return the same masked scores (to fp32 rounding) and the same top-k indices as the code
itself, and the scoring nodes must be gone. Refusals: near-misses that are *not* the indexer score.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from capture import GraphCapture
from conftest import trace_one_topk
from indexer_layouts import LAYOUTS, future, make_inputs

from fx_indexcache.fuse.substitute import match_indexer_score, substitute_fused_indexer

aten = torch.ops.aten


def _ops(gm, *targets) -> int:
    return sum(n.target in targets for n in gm.graph.nodes)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
@pytest.mark.parametrize("S", [6, 1], ids=["prefill", "decode"])
def test_layout_is_proven_fused_and_exact(layout, S, kernel_ok):
    args = make_inputs(layout, S=S, seed=S)
    gm, topk = trace_one_topk(layout.fn, *args)
    match = match_indexer_score(topk)
    assert not isinstance(match, str), match
    q_roles = "".join(r for r in match.q_roles if r != "1")
    want_roles = layout.q_roles if S > 1 else layout.q_roles.replace("s", "")  # S=1: the query axis is a unit
    assert q_roles == want_roles, match
    assert fake_dtype(match.q) == fake_dtype(match.k) == torch.bfloat16  # the leaves ahead of the upcasts
    reductions = (aten.bmm.default, aten.mm.default, aten.sum.dim_IntList, aten.mean.dim)
    products = _ops(gm, *reductions)
    (record,) = substitute_fused_indexer(gm.graph, [topk])
    assert record.fused, record
    gm.recompile()
    assert _ops(gm, torch.ops.fx_indexcache.indexer_logits.default) == 1
    assert _ops(gm, aten.relu.default) == 0
    assert _ops(gm, aten.topk.default) == 0 and _ops(gm, torch.ops.fx_indexcache.topk_indices.default) == 1
    assert _ops(gm, *reductions) < products
    got_score, got_idx = gm(*args)
    want_score, want_idx = layout.fn(*args)
    assert got_score.shape == want_score.shape and got_score.dtype == torch.float32
    assert torch.equal(torch.isneginf(got_score), torch.isneginf(want_score))
    torch.testing.assert_close(got_score, want_score, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_idx, want_idx)


def fake_dtype(node):
    return node.meta["val"].dtype


def test_unsupported_support_check_leaves_a_record_not_a_rewrite():
    """Off CUDA the real support check refuses: one record, the reason, the graph untouched."""
    layout = LAYOUTS[0]
    args = make_inputs(layout)
    gm, topk = trace_one_topk(layout.fn, *args)
    before = len(gm.graph.nodes)
    (record,) = substitute_fused_indexer(gm.graph, [topk])
    assert not record.fused and "CUDA" in record.detail and record.layer is None
    assert record.note().startswith(f"{topk.name}: left as is: fused kernel unsupported")
    assert len(gm.graph.nodes) == before


def _unbatched(seed=0, S=5, T=12, H=3, D=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S, H, D, generator=g).bfloat16(), torch.randn(T, D, generator=g).bfloat16(),
            torch.rand(S, H, generator=g))


@pytest.mark.parametrize(
    "kind, expect",
    [
        ("score_in_float64", "the score is torch.float64"),
        ("negative_factor_after_relu", "< 0"),
        ("keys_summed_not_heads", "not a head-weighted sum"),
        ("score_over_keys_and_heads", "not a 2-D"),
        ("weights_per_key", "plays no role"),
    ],
)
def test_near_misses_are_refused(kind, expect, kernel_ok):
    def fn(q, k, w):
        qk = torch.einsum("shd,td->sht", q.float(), k.float())
        if kind == "score_in_float64":  # the kernel writes fp32 (or rounds to bf16/fp16): fp64 would lose bits
            score = torch.einsum("sht,sh->st", F.relu(qk.double()), w.double())
        elif kind == "negative_factor_after_relu":
            score = torch.einsum("sht,sh->st", F.relu(qk) * -2.0, w)
        elif kind == "keys_summed_not_heads":  # sums over t: [S, H] is no indexer score
            score = torch.einsum("sht,sh->sh", F.relu(qk), w)
        elif kind == "score_over_keys_and_heads":
            score = (F.relu(qk) * w[..., None]).unsqueeze(0)
        else:  # weights_per_key
            score = torch.einsum("sht,th->st", F.relu(qk), w.new_ones(k.shape[0], q.shape[1]))
        score = score.masked_fill(future(*score.shape[-2:], score.device), float("-inf")) if score.dim() == 2 else score
        return score.topk(2, dim=-1).indices

    args = _unbatched()
    gm, topk = trace_one_topk(fn, *args)
    match = match_indexer_score(topk)
    assert isinstance(match, str) and expect in match, match
    before = len(gm.graph.nodes)
    (record,) = substitute_fused_indexer(gm.graph, [topk])
    assert not record.fused and len(gm.graph.nodes) == before


def test_topk_values_are_gathered_and_order_kept(kernel_ok):
    """A model that reads the top-k values too: they come back by a gather, in the graph's sorted order."""

    def fn(q, k, w):
        score = torch.einsum("sht,sh->st", F.relu(torch.einsum("shd,td->sht", q.float(), k.float())), w)
        vals, idx = score.masked_fill(future(*score.shape, score.device), float("-inf")).topk(4, dim=-1)
        return vals * 2.0, idx

    args = _unbatched(seed=3)
    gm, topk = trace_one_topk(fn, *args)
    (record,) = substitute_fused_indexer(gm.graph, [topk])
    assert record.fused and "topk_indices" in record.detail, record
    gm.recompile()
    assert _ops(gm, aten.topk.default) == 0 and _ops(gm, aten.gather.default) == 1
    (got_v, got_i), (want_v, want_i) = gm(*args), fn(*args)
    assert torch.equal(got_i, want_i) and got_i.dtype == torch.int64
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-6)


def test_unbatched_stack_index_cache_then_fusion_is_exact(kernel_ok):
    """A whole unbatched stack (tests/indexer_stack.py): IndexCache FSFS removes the S indexers, the two
    F layers are fused (score and top-k), and the compiled stack equals the hand-written IndexCache."""
    from indexer_stack import UnbatchedDSAStack

    from fx_indexcache import IndexCacheConfig, IndexCachePass, detect

    torch.manual_seed(0)
    model = UnbatchedDSAStack(num_layers=4, hidden=64, heads=4, head_dim=16, topk=8)
    past_k, past_v = model.empty_cache(20)
    x = torch.randn(12, 64)
    graph_pass = IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_pattern="FSFS"))
    reports, records = [], []

    def rewrite(graph):
        reports.append(graph_pass.run(graph))
        records.extend(substitute_fused_indexer(graph, detect(graph).sites))

    with torch.no_grad():
        got_x, got_idx = torch.compile(model, backend=GraphCapture(rewrite))(x, past_k, past_v)
        want_x, want_idx = model(x, past_k, past_v, pattern="FSFS")
    assert [r.indexers_removed for r in reports] == [2]
    assert [(r.layer, r.fused) for r in records] == [(0, True), (2, True)], records
    assert all(torch.equal(a, b) for a, b in zip(got_idx, want_idx))
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)


def test_dynamic_key_count_is_fused_and_exact(kernel_ok):
    """``dynamic=True`` (symbolic T): the score is still proven and fused for every length it runs at; a
    top-k whose k is symbolic (``min(topk, T)``) stays aten.topk, and the record says so."""
    layout = LAYOUTS[0]
    records = []

    def rewrite(graph):
        records.extend(substitute_fused_indexer(graph, [n for n in graph.nodes if n.target == aten.topk.default]))

    torch._dynamo.reset()
    compiled = torch.compile(layout.fn, backend=GraphCapture(rewrite), dynamic=True)
    for T in (20, 24, 31):
        args = make_inputs(layout, T=T, seed=T)
        (got_score, got_idx), (want_score, want_idx) = compiled(*args), layout.fn(*args)
        assert torch.equal(got_idx, want_idx)
        torch.testing.assert_close(got_score, want_score, rtol=1e-5, atol=1e-6)
    assert records and all(r.fused and "top-k kept as aten.topk" in r.detail for r in records), records
