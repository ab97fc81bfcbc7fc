"""The substitution's choice between ``indexer_topk_fused`` (score + top-k in one op) and the two-kernel path.

The one op is opt-in (``fuse_score_and_topk``; the two kernels measured faster): the tests below ask for it
(``score_and_topk=True``), but for the ones that check the default and the config's way in.

CPU only: the ``fused_ok`` fixture makes both support checks (``substitute.kernel_refusal`` and
``fused_topk_site.fused_topk_refusal``) accept the proven sites, so the rewrite is made off CUDA and the ops run
their references (the fused op: torch.topk over the masked reference scores). Where only the top-k's indices
are read the site must become one ``indexer_topk_fused`` (no ``aten.topk``, no logits op) and give the
original graph's indices; where the score, the masked score or the top-k's values are read elsewhere it must
keep ``indexer_logits`` + ``topk_indices``, its record naming why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from capture import GraphCapture
from conftest import trace_one_topk

from fx_indexcache import detect
from fx_indexcache.fuse import fused_topk_site, kernels  # noqa: F401  (kernels: registers the ops)
from fx_indexcache.fuse import substitute as sub
from fx_indexcache.fuse.substitute import substitute_fused_indexer
from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel

FUSED = torch.ops.fx_indexcache.indexer_topk_fused.default


@pytest.fixture
def fused_ok(monkeypatch):
    """Both kernels accept every proven site (off CUDA their ops run the references)."""
    monkeypatch.setattr(sub, "kernel_refusal", lambda q, k, w, scale: None)
    monkeypatch.setattr(fused_topk_site, "fused_topk_refusal", lambda q, k, w, scale, topk: None)


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _inputs(B=2, S=6, T=10, H=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g), torch.randn(B, T, D, generator=g), torch.rand(B, S, H, generator=g))


def _score(q, k, w):
    return torch.einsum("bsh,bsht->bst", w, F.relu(torch.einsum("bshd,btd->bsht", q, k) * 0.5))


def test_reference_model_indices_only_runs_one_op_per_layer(fused_ok):
    """The reference model's masked_fill(future, -inf) + topk(...).indices: every layer one fused op."""
    cfg = DSAModelConfig.tiny(num_layers=2, first_k_dense_layers=2)
    model = ReferenceDSAModel(cfg, seed=0)
    records: list = []
    backend = GraphCapture(lambda graph: records.extend(substitute_fused_indexer(graph, detect(graph).sites, score_and_topk=True)))
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits, want_idx = model(ids, None, 0, True)
        got_logits, got_idx = torch.compile(model, backend=backend)(ids, None, 0, True)
    assert [r.layer for r in records] == [0, 1]
    assert all(r.fused and r.topk_fused for r in records), records
    assert all(r.note().startswith(f"layer {r.layer}: fused indexer_topk_fused (") for r in records), records
    assert "no logits written" in records[0].detail
    (gm,) = backend.graphs
    targets = _targets(gm)
    assert targets.count(FUSED) == 2 and torch.ops.aten.topk.default not in targets
    assert not any("indexer_logits" in str(t) or "topk_indices" in str(t) for t in targets)
    for got, want in zip(got_idx, want_idx):
        assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", ["none", "additive", "masked_fill", "where_keep", "additive_then_fill"])
def test_masks_the_op_takes_give_the_graphs_indices(mask, fused_ok):
    def fn(q, k, w, bias, keep):
        score = _score(q, k, w)
        if mask in ("additive", "additive_then_fill"):
            score = score + bias  # [S, T], broadcast over the batch
        if mask in ("masked_fill", "additive_then_fill"):
            score = score.masked_fill(~keep, float("-inf"))
        if mask == "where_keep":
            score = torch.where(keep, score, float("-inf"))
        return score.topk(4, dim=-1).indices

    q, k, w = _inputs()
    keep = torch.rand(2, 1, 10, generator=torch.Generator().manual_seed(1)) < 0.7
    keep[1, 0, :] = False  # a batch row with every key masked: its picks are -inf ties
    args = (q, k, w, torch.randn(6, 10), keep)
    gm, topk = trace_one_topk(fn, *args)
    (record,) = substitute_fused_indexer(gm.graph, [topk], score_and_topk=True)
    assert record.fused and record.topk_fused, record
    gm.recompile()
    assert _targets(gm).count(FUSED) == 1 and torch.ops.aten.topk.default not in _targets(gm)
    got, want = gm(*args), fn(*args)
    assert got.dtype == want.dtype == torch.int64 and got.shape == want.shape
    if mask in ("masked_fill", "where_keep", "additive_then_fill"):
        want, got = want[0], got[0]  # the all-masked row: any 4 keys are a correct top-4 of -inf ties
    assert torch.equal(got, want)


@pytest.mark.parametrize("read, expect", [
    ("score", "is also read by"),
    ("masked_score", "is also read by"),
    ("values", "the top-k's values are read"),
    ("mask_after_fill", "stands between the score and the top-k"),
])
def test_a_score_read_elsewhere_keeps_two_kernels_and_says_why(read, expect, fused_ok):
    def fn(q, k, w, keep):
        score = _score(q, k, w)
        masked = score.masked_fill(~keep, float("-inf"))
        if read == "mask_after_fill":
            masked = masked * 2.0
        top = masked.topk(4, dim=-1)
        extra = {"score": lambda: score.sum(), "masked_score": lambda: masked.amax(),
                 "values": lambda: top.values.sum()}.get(read)
        return top.indices if extra is None else (top.indices, extra())

    q, k, w = _inputs()
    args = (q, k, w, torch.ones(6, 10, dtype=torch.bool))
    gm, topk = trace_one_topk(fn, *args)
    (record,) = substitute_fused_indexer(gm.graph, [topk], score_and_topk=True)
    assert record.fused and not record.topk_fused, record
    assert expect in record.detail and "score + top-k not in one op" in record.detail, record.detail
    assert record.note().startswith("fused indexer_logits (", len(record.site) + 2), record.note()
    gm.recompile()
    targets = _targets(gm)
    assert FUSED not in targets and torch.ops.fx_indexcache.indexer_logits.default in targets
    for got, want in zip(*(torch.utils._pytree.tree_leaves(r) for r in (gm(*args), fn(*args)))):
        torch.testing.assert_close(got, want)


def test_without_cuda_the_fused_check_refuses_and_names_it(monkeypatch):
    """Only the logits kernel forced: the real fused check runs on the CPU leaves and refuses, with its reason."""
    monkeypatch.setattr(sub, "kernel_refusal", lambda q, k, w, scale: None)
    gm, topk = trace_one_topk(lambda q, k, w: _score(q, k, w).topk(3, dim=-1).indices, *_inputs())
    (record,) = substitute_fused_indexer(gm.graph, [topk], score_and_topk=True)
    assert record.fused and not record.topk_fused
    assert "score + top-k not in one op: fused kernel unsupported: inputs must all be on one CUDA device" in record.detail


def test_fp8_and_narrow_scores_keep_their_own_path(fused_ok):
    gm, topk = trace_one_topk(lambda q, k, w: _score(q, k, w).topk(3, dim=-1).indices, *_inputs())
    match = sub.match_indexer_score(topk)
    assert fused_topk_site.plan_site(match, topk, "fp8") == "fp8 scoring keeps its logits kernel and the separate top-k"
    gm, topk = trace_one_topk(lambda q, k, w: _score(q, k, w).bfloat16().topk(3, dim=-1).indices, *_inputs())
    match = sub.match_indexer_score(topk)
    assert fused_topk_site.plan_site(match, topk, "bf16") == "the score is bfloat16: its top-k reads the rounded score"


def test_transformers_v32_additive_mask_prefill_and_decode(fused_ok):
    """transformers' DeepSeek-V3.2 indexer adds its [B, S, T] float mask (a select of the 4-D one) before the
    top-k: prefill and a decode step, each F layer one fused op, the generated ids unchanged."""
    pytest.importorskip("transformers")
    import hf_oracle as H

    try:
        tiny = H.TINY_DSA_MODELS["deepseek_v32"]()
    except Exception as e:  # transformers without DeepSeek-V3.2
        pytest.skip(f"no DeepseekV32 in this transformers: {e}")
    want = H.prefill_and_decode(tiny.model, tiny, 12, 1)
    records: list = []
    backend = GraphCapture(lambda graph: records.extend(substitute_fused_indexer(graph, detect(graph).sites, score_and_topk=True)))
    got = H.prefill_and_decode(torch.compile(tiny.model, backend=backend), tiny, 12, 1)
    assert len(records) == 2 * len(tiny.dsa_layers) and all(r.topk_fused for r in records), records
    assert all(_targets(gm).count(FUSED) == len(tiny.dsa_layers) for gm in backend.graphs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_algorithms_ask_the_op_for_one_order(deterministic, fused_ok):
    """Unsorted, the fused op's column order may change from run to run; a user who asks torch for deterministic
    algorithms gets the sorted order (an order an unsorted top-k may return, and the same every run)."""
    def fn(q, k, w):
        return _score(q, k, w).topk(4, dim=-1, sorted=False).indices

    gm, topk = trace_one_topk(fn, *_inputs())
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        (record,) = substitute_fused_indexer(gm.graph, [topk], score_and_topk=True)
    finally:
        torch.use_deterministic_algorithms(before)
    (op,) = [n for n in gm.graph.nodes if n.target is FUSED]
    assert record.topk_fused and op.args[7] is deterministic


def test_by_default_a_site_read_only_by_its_indices_keeps_two_kernels_and_says_why(fused_ok):
    gm, topk = trace_one_topk(lambda q, k, w: _score(q, k, w).topk(3, dim=-1).indices, *_inputs())
    (record,) = substitute_fused_indexer(gm.graph, [topk])
    assert record.fused and not record.topk_fused, record
    assert "score + top-k not in one op: fuse_score_and_topk is off" in record.detail, record.detail
    gm.recompile()
    assert FUSED not in _targets(gm) and torch.ops.fx_indexcache.indexer_logits.default in _targets(gm)


@pytest.mark.parametrize("asked", [None, False, True])
def test_the_config_key_reaches_the_substitution(asked, fused_ok, monkeypatch):
    """Through the pass the rewrite runs on CUDA sites only: the reference model's sites are made to look like
    CUDA ones, and the key (given or not) decides between one op and two kernels, the indices unchanged."""
    from fx_indexcache.config import IndexCacheConfig
    from fx_indexcache.integrations import graph_pass

    monkeypatch.setattr(graph_pass, "fake_value", lambda node: type("Cuda", (), {"is_cuda": True})())
    config = IndexCacheConfig(fuse_indexer_kernel=True, **({} if asked is None else {"fuse_score_and_topk": asked}))
    cfg = DSAModelConfig.tiny(num_layers=2, first_k_dense_layers=2)
    model = ReferenceDSAModel(cfg, seed=0)
    records: list = []
    backend = GraphCapture(lambda graph: records.extend(graph_pass.fuse_indexers(graph, detect(graph).sites, config)[0]))
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, want_idx = model(ids, None, 0, True)
        _, got_idx = torch.compile(model, backend=backend)(ids, None, 0, True)
    assert [r.topk_fused for r in records] == [bool(asked)] * 2, records
    (gm,) = backend.graphs
    assert _targets(gm).count(FUSED) == (2 if asked else 0)
    for got, want in zip(got_idx, want_idx):
        assert torch.equal(got, want)


def test_a_bad_value_names_the_key():
    from fx_indexcache.config import IndexCacheConfig

    with pytest.raises(ValueError, match="fuse_score_and_topk='yes' is not allowed"):
        IndexCacheConfig(fuse_score_and_topk="yes")
