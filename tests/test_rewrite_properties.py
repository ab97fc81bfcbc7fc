"""Property tests: for any small DSA model and any config, compiled-with-pass == hand-written IndexCache."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CapturingBackend, model_pair, topk_nodes
from fx_indexcache import IndexCacheConfig
from fx_indexcache.models.reference import DSAModelConfig

SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@st.composite
def dsa_models(draw):
    layers = draw(st.integers(1, 8))
    rope = draw(st.sampled_from([4, 8]))
    experts = draw(st.sampled_from([4, 8]))
    config = DSAModelConfig.tiny(
        num_layers=layers,
        hidden_size=draw(st.sampled_from([32, 48])),
        num_heads=draw(st.integers(1, 4)),
        qk_rope_head_dim=rope,
        index_n_heads=draw(st.integers(1, 4)),
        index_head_dim=draw(st.sampled_from([rope, 2 * rope])),
        index_topk=draw(st.integers(1, 24)),
        first_k_dense_layers=draw(st.integers(0, min(layers, 2))),
        n_routed_experts=experts,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        vocab_size=64,
        max_seq_len=64,
    )
    return config


@st.composite
def index_cache_options(draw, num_layers):
    kind = draw(st.sampled_from(["freq", "pattern", "types"]))
    if kind == "freq":
        return {"index_topk_freq": draw(st.integers(1, 4)), "index_skip_topk_offset": draw(st.integers(1, 3))}
    pattern = "".join(draw(st.lists(st.sampled_from("FS"), min_size=num_layers, max_size=num_layers)))
    if kind == "pattern":
        return {"index_topk_pattern": pattern}
    return {"indexer_types": ["full" if c == "F" else "shared" for c in pattern]}


@SETTINGS
@given(data=st.data())
def test_compiled_pass_equals_hand_written_index_cache(data):
    torch._dynamo.reset()  # hypothesis runs many examples inside one test
    config = data.draw(dsa_models())
    options = data.draw(index_cache_options(config.num_layers))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    batch, length = data.draw(st.integers(1, 2)), data.draw(st.integers(2, 20))
    model, oracle = model_pair(config, dtype)
    backend = CapturingBackend(**options)
    expected_pattern = backend.config.executed_pattern(config.num_layers)
    oracle.set_index_cache_pattern(expected_pattern)
    tokens = torch.randint(0, config.vocab_size, (batch, length))

    with torch.no_grad():
        logits, indices = torch.compile(model, backend=backend, fullgraph=True)(tokens, None, 0, True)
        want_logits, want_indices = oracle(tokens, None, 0, True)

    (report,) = backend.reports
    assert report.pattern == expected_pattern
    for layer, (got, want) in enumerate(zip(indices, want_indices)):
        assert torch.equal(got, want), f"layer {layer} picked other tokens"
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits, want_logits, rtol=tolerance, atol=tolerance)

    routers = 3 * (config.num_layers - config.first_k_dense_layers)
    (graph,) = backend.graphs
    assert len(topk_nodes(graph)) == expected_pattern.count("F") + routers
    assert report.router_topk == routers


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(config=dsa_models(), length=st.integers(2, 20))
def test_all_full_config_leaves_the_graph_equivalent(config, length):
    torch._dynamo.reset()
    model, original = model_pair(config)
    backend = CapturingBackend(index_topk_freq=1)
    tokens = torch.randint(0, config.vocab_size, (1, length))
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(tokens)
        want = original(tokens)
    (report,) = backend.reports
    assert report.indexers_removed == 0 and report.pattern == "F" * config.num_layers
    assert sum(d.nodes_removed for d in report.decisions) == 0
    assert len(topk_nodes(backend.graphs[0])) == config.num_layers + report.router_topk
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_use_index_cache_false_changes_nothing():
    config = DSAModelConfig.tiny(num_layers=3)
    model, original = model_pair(config)
    backend = CapturingBackend(use_index_cache=False, index_topk_freq=2)
    tokens = torch.randint(0, config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(tokens), original(tokens))
    assert backend.reports[0].indexers_removed == 0
    assert len(topk_nodes(backend.graphs[0])) == 3 + backend.reports[0].router_topk


def test_leading_s_is_computed_and_the_report_says_why():
    """SSF: layer 0 has nothing computed before it and computes (the engines would read an unset buffer); layer 1
    reads what layer 0 computed, the one-buffer rule."""
    config = DSAModelConfig.tiny(num_layers=3)
    model, oracle = model_pair(config)
    backend = CapturingBackend(index_topk_pattern="SSF")
    tokens = torch.randint(0, config.vocab_size, (1, 24))
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(tokens)
        oracle.set_index_cache_pattern(IndexCacheConfig(index_topk_pattern="SSF").executed_pattern(3))
        want = oracle(tokens)
    assert IndexCacheConfig(index_topk_pattern="SSF").executed_pattern(3) == "FSF"
    torch.testing.assert_close(got, want)
    decisions = backend.reports[0].decisions
    assert [d.action for d in decisions] == ["computed", "shared", "computed"]
    assert "no indexed layer computing before it" in decisions[0].note and decisions[1].source_layer == 0


def test_pattern_shorter_than_the_graph_is_an_error_naming_the_key():
    config = DSAModelConfig.tiny(num_layers=3)
    model, _ = model_pair(config)
    compiled = torch.compile(model, backend=CapturingBackend(index_topk_pattern="FS"))
    try:
        with torch.no_grad():
            compiled(torch.randint(0, config.vocab_size, (1, 8)))
    except Exception as error:  # dynamo wraps backend errors
        assert "index_topk_pattern='FS' has 2 entries" in str(error) and "3 decoder layers" in str(error)
    else:
        raise AssertionError("a 2-character pattern for 3 DSA layers must be rejected")


def test_config_from_model_config_rejects_wrong_length():
    try:
        IndexCacheConfig.from_hf_config({"use_index_cache": True, "index_topk_pattern": "FSF", "num_hidden_layers": 4})
    except ValueError as error:
        assert "index_topk_pattern" in str(error) and "4 entries, not 3" in str(error)
    else:
        raise AssertionError("length mismatch must raise")
