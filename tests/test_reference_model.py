"""Tests of the built-in DeepSeek-V3.2-shaped reference model and its hand-written IndexCache oracle.

Kept small (4-layer tiny model, CPU). The one Inductor compile (prefill + decode in one graph) dominates:
it is marked `slow` (deselect with -m "not slow"); the rest runs in 30-55 s on 2 shared cores.
"""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fx_indexcache.models.reference.model import (
    DenseMLP,
    DSAModelConfig,
    LightningIndexer,
    MoE,
    MoEGate,
    ReferenceDSAModel,
)

B, S = 2, 24
TOPK = 8


def small_config(**overrides) -> DSAModelConfig:
    base = dict(num_layers=4, first_k_dense_layers=1, index_topk=TOPK, max_seq_len=48)
    base.update(overrides)
    return DSAModelConfig.tiny(**base)


@pytest.fixture(scope="module")
def model() -> ReferenceDSAModel:
    return ReferenceDSAModel(small_config(), seed=0)


@pytest.fixture(scope="module")
def ids(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (B, S), generator=g)


@pytest.fixture(autouse=True)
def _no_grad_and_reset(model):
    model.set_index_cache_pattern(None)
    with torch.no_grad():
        yield
    model.set_index_cache_pattern(None)


def decode_stepwise(model, ids, cache, start=0):
    return torch.cat([model(ids[:, t : t + 1], cache=cache, start_pos=t) for t in range(start, ids.shape[1])], 1)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_size", 0),
        ("num_layers", -1),
        ("index_topk", 2.5),
        ("num_heads", True),
        ("qk_rope_head_dim", 7),
        ("index_head_dim", 8),  # < qk_rope_head_dim (16)
        ("first_k_dense_layers", 9),  # > num_layers (8)
        ("n_group", 3),  # does not divide 8 experts
        ("topk_group", 3),  # > n_group (2)
        ("num_experts_per_tok", 5),  # > topk_group * experts per group (4)
        ("rms_norm_eps", 0.0),
        ("rope_theta", float("nan")),
        ("n_shared_experts", -1),
        ("dense_mlp_instead_of_moe", "yes"),
    ],
)
def test_bad_config_value_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=field) as err:
        DSAModelConfig.tiny(**{field: value})
    assert repr(value) in str(err.value)


def test_unknown_override_raises():
    with pytest.raises(ValueError, match="no_such_field"):
        DSAModelConfig.tiny(no_such_field=1)


def test_deepseek_v32_preset_has_real_dims():
    c = DSAModelConfig.deepseek_v32()
    assert (c.num_layers, c.hidden_size, c.num_heads, c.vocab_size) == (61, 7168, 128, 129280)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim) == (
        1536,
        512,
        64,
        128,
        128,
    )
    assert (c.index_n_heads, c.index_head_dim, c.index_topk) == (64, 128, 2048)
    assert (c.first_k_dense_layers, c.intermediate_size) == (3, 18432)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (
        256,
        1,
        8,
        2048,
    )
    assert c.num_moe_layers == 58 and c.kv_cache_dim == 576
    dense = DSAModelConfig.deepseek_v32(num_layers=4, moe=False)
    assert dense.dense_mlp_instead_of_moe and dense.num_moe_layers == 0
    assert dense.dense_equivalent_intermediate_size == 2048 * 9
    assert DSAModelConfig.deepseek_v32(num_layers=2).first_k_dense_layers == 2
    assert DSAModelConfig.tiny(num_layers=1).first_k_dense_layers == 1


def test_dense_mlp_instead_of_moe_builds_no_router():
    cfg = small_config(dense_mlp_instead_of_moe=True)
    m = ReferenceDSAModel(cfg)
    assert not any(isinstance(x, (MoE, MoEGate)) for x in m.modules())
    assert m.layers[3].mlp.w1.out_features == cfg.moe_intermediate_size * (cfg.num_experts_per_tok + 1)
    assert m.layers[0].mlp.w1.out_features == cfg.intermediate_size
    moe = ReferenceDSAModel(small_config())
    assert isinstance(moe.layers[0].mlp, DenseMLP) and isinstance(moe.layers[1].mlp, MoE)


def test_module_paths():
    m = ReferenceDSAModel(small_config())
    names = dict(m.named_modules())
    assert isinstance(names["layers.3.attn.indexer"], LightningIndexer)
    assert isinstance(names["layers.3.mlp.gate"], MoEGate)


def test_seeded_init_is_deterministic():
    a, b, c = (ReferenceDSAModel(small_config(), seed=s) for s in (5, 5, 6))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.2.attn.indexer.wk.weight"], sc["layers.2.attn.indexer.wk.weight"])


# ---------------------------------------------------------------------------------------------
# Numerics: cache, decode, causality
# ---------------------------------------------------------------------------------------------


def test_prefill_with_cache_equals_without_and_indices_are_causal(model, ids):
    ref, ref_idx = model(ids, return_indices=True)
    cache = model.new_cache(B)
    out, idx = model(ids, cache=cache, return_indices=True)
    assert out.dtype == torch.float32 and out.shape == (B, S, model.config.vocab_size)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert len(idx) == model.config.num_layers
    for i, j in zip(idx, ref_idx):
        assert i.shape == (B, S, TOPK) and i.dtype == torch.int64
        assert torch.equal(i, j)
    # Once at least TOPK keys are visible every selected key is causal.
    slot = torch.arange(S).view(1, S, 1)
    for i in idx:
        assert bool((i[:, TOPK - 1 :] <= slot[:, TOPK - 1 :]).all())
    # Cache rows past the prompt stay untouched.
    assert bool((cache.kv[0][:, S:] == 0).all()) and bool((cache.kv[0][:, :S] != 0).any())


def test_future_tokens_do_not_change_past_logits(model, ids):
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % model.config.vocab_size
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-5)
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-2


def test_prefill_equals_stepwise_decode(model, ids):
    ref = model(ids)
    dec = decode_stepwise(model, ids, model.new_cache(B))
    torch.testing.assert_close(dec, ref, rtol=0, atol=1e-4)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(split=st.integers(1, S - 1), pattern_bits=st.integers(0, 7))
def test_chunked_prefill_equals_full_prefill(model, ids, split, pattern_bits):
    pattern = "F" + "".join("S" if pattern_bits >> k & 1 else "F" for k in range(3))
    model.set_index_cache_pattern(pattern)
    ref = model(ids)
    cache = model.new_cache(B)
    out = torch.cat([model(ids[:, :split], cache=cache), model(ids[:, split:], cache=cache, start_pos=split)], 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_bad_forward_arguments_raise(model, ids):
    cache = model.new_cache(B)
    with pytest.raises(ValueError, match="capacity"):
        model(ids, cache=cache, start_pos=40)
    with pytest.raises(ValueError, match="batch"):
        model(ids[:1], cache=cache)


def test_bf16_runs_and_keeps_dtype(ids):
    m = ReferenceDSAModel(small_config(), dtype=torch.bfloat16)
    cache = m.new_cache(B)
    assert cache.kv[0].dtype == torch.bfloat16 and cache.index_k[0].dtype == torch.bfloat16
    out = m(ids[:, :12], cache=cache)
    step = m(ids[:, 12:13], cache=cache, start_pos=12)
    assert out.dtype == torch.bfloat16 and step.shape == (B, 1, m.config.vocab_size)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(step).all())


# ---------------------------------------------------------------------------------------------
# IndexCache oracle
# ---------------------------------------------------------------------------------------------


def test_all_f_pattern_equals_no_pattern_exactly(model, ids):
    ref, ref_idx = model(ids, return_indices=True)
    model.set_index_cache_pattern("FFFF")
    out, idx = model(ids, return_indices=True)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(idx, ref_idx))


@pytest.mark.parametrize("pattern", ["SFFF", "FFSX", "FSF", "fsff", 3])
def test_invalid_pattern_raises(model, pattern):
    with pytest.raises(ValueError, match="pattern"):
        model.set_index_cache_pattern(pattern)
    assert model.index_cache_pattern is None


def test_s_layers_reuse_nearest_preceding_f_indices(model, ids):
    ref, ref_idx = model(ids, return_indices=True)
    model.set_index_cache_pattern("FSSF")
    out, idx = model(ids, return_indices=True)
    assert torch.equal(idx[0], ref_idx[0])  # nothing upstream of layer 0 changed
    assert idx[1] is idx[0] and idx[2] is idx[0]
    assert not torch.equal(idx[3], idx[0])
    assert (out - ref).abs().max() > 1e-3  # the reused indices do change the result
    model.set_index_cache_pattern("FFSS")
    _, idx = model(ids, return_indices=True)
    assert idx[2] is idx[1] and idx[3] is idx[1] and torch.equal(idx[1], ref_idx[1])


def test_s_layer_indexer_not_called_and_its_key_cache_untouched(model, ids):
    calls = collections.Counter()
    hooks = [
        model.layers[i].attn.indexer.register_forward_hook(lambda mod, a, o, i=i: calls.update([i]))
        for i in range(4)
    ]
    try:
        model.set_index_cache_pattern("FSFS")
        cache = model.new_cache(B)
        model(ids[:, :20], cache=cache)
        model(ids[:, 20:21], cache=cache, start_pos=20)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {0: 2, 2: 2}
    for i in range(4):
        assert bool((cache.kv[i][:, :21] != 0).any())  # every layer caches its latent KV
        wrote_keys = bool((cache.index_k[i] != 0).any())
        assert wrote_keys == (i in (0, 2)), i


def test_pattern_decode_equals_pattern_prefill(model, ids):
    model.set_index_cache_pattern("FSFS")
    ref = model(ids)
    dec = decode_stepwise(model, ids, model.new_cache(B))
    torch.testing.assert_close(dec, ref, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def _recording_backend():
    """AOT graphs kept as they come; keep_inference_input_mutations: cache writes stay in the graph as
    copy_ nodes, as under Inductor."""
    from capture import GraphCapture

    return GraphCapture(lambda graph: None, keep_inference_input_mutations=True)


def _topk_owners(gm):
    owners = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == torch.ops.aten.topk.default:
            stack = n.meta.get("nn_module_stack") or {}
            owners.append(list(stack.values())[-1][1] if stack else None)
    return owners


def test_traced_graph_holds_indexer_and_router_topk_and_pattern_recompiles(ids):
    torch._dynamo.reset()
    m = ReferenceDSAModel(small_config())
    backend = _recording_backend()
    graphs = backend.graphs
    cm = torch.compile(m, fullgraph=True, backend=backend)
    cache = m.new_cache(B)
    out = cm(ids, cache=cache)
    torch.testing.assert_close(out, m(ids), rtol=0, atol=1e-5)
    owners = collections.Counter(_topk_owners(graphs[-1]))
    assert owners == {LightningIndexer: 4, MoEGate: 3 * 3}
    copies = [n for n in graphs[-1].graph.nodes if n.target == torch.ops.aten.copy_.default]
    assert len(copies) == 2 * 4  # kv + index_k writes of every layer

    m.set_index_cache_pattern("FSFS")  # a Python attribute: dynamo guards on it and retraces
    out = cm(ids, cache=m.new_cache(B))
    assert len(graphs) == 2
    torch.testing.assert_close(out, m(ids), rtol=0, atol=1e-5)
    owners = collections.Counter(_topk_owners(graphs[-1]))
    assert owners == {LightningIndexer: 2, MoEGate: 3 * 3}
    copies = [n for n in graphs[-1].graph.nodes if n.target == torch.ops.aten.copy_.default]
    assert len(copies) == 4 + 2  # S layers write no indexer keys
    torch._dynamo.reset()


def test_decode_recompiles_once_then_start_pos_is_symbolic(ids):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m = ReferenceDSAModel(small_config())
    counter = CompileCounter()
    cm = torch.compile(m, fullgraph=True, backend=counter)
    cache = m.new_cache(B)
    cm(ids[:, :4], cache=cache)
    for p in range(4, 12):  # T crosses index_topk (8) on the way: K = min(topk, T) stays symbolic
        out = cm(ids[:, p : p + 1], cache=cache, start_pos=p)
    assert counter.frame_count == 2  # prefill, then one dynamic-start_pos decode graph
    torch.testing.assert_close(out, m(ids[:, 11:12], cache=cache.clone(), start_pos=11), rtol=0, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow  # ~10 s with a warm Inductor cache, 1-2 min cold on 2 busy cores
def test_inductor_prefill_and_decode_match_eager(ids):
    """Plain Inductor compiles the reference model's prefill and decode as eager runs them (a dense layer and a
    DSA layer: two layers keep the compile short)."""
    torch._dynamo.reset()
    model = ReferenceDSAModel(small_config(num_layers=2), seed=0)
    prompt = 20

    def prefill_then_decode(prompt_ids, next_ids, cache):
        first = model(prompt_ids, cache=cache)
        return first, model(next_ids, cache=cache, start_pos=prompt)

    compiled = torch.compile(prefill_then_decode, fullgraph=True, backend="inductor")
    eager_cache, comp_cache = model.new_cache(B), model.new_cache(B)
    want = prefill_then_decode(ids[:, :prompt], ids[:, prompt : prompt + 1], eager_cache)
    got = compiled(ids[:, :prompt], ids[:, prompt : prompt + 1], comp_cache)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    for w, g in zip(eager_cache.kv + eager_cache.index_k, comp_cache.kv + comp_cache.index_k):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    torch._dynamo.reset()
