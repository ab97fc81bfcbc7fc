"""Inductor end to end: generated code, dynamic lengths, decode with the cache, FX graph cache,
graph breaks and regional compilation. Every path is either IndexCache or the original, never wrong."""

from __future__ import annotations

import collections
import dataclasses

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from conftest import KEYED, CapturingBackend, model_pair
from fx_indexcache import IndexCacheConfig, indexcache_backend, reports
from fx_indexcache.models.reference import DSAModelConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = DSAModelConfig.tiny(num_layers=4, first_k_dense_layers=2)


def test_inductor_code_has_no_topk_for_s_layers_and_matches_the_oracle():
    model, oracle = model_pair(TINY)
    options = {"index_topk_pattern": "FSFS"}
    oracle.set_index_cache_pattern("FSFS")
    tokens = torch.randint(0, TINY.vocab_size, (2, 30))
    with torch.no_grad():
        compiled = torch.compile(model, backend=indexcache_backend, options=options)
        (logits, indices), code = run_and_get_code(compiled, tokens, None, 0, True)
        want, want_indices = oracle(tokens, None, 0, True)
    for got_layer, want_layer in zip(indices, want_indices):
        assert torch.equal(got_layer, want_layer)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    (report,) = reports()
    calls = sum(len(re.findall(r"aten\.topk\.default\(", source)) for source in code)
    assert calls == 2 + report.router_topk  # two F indexers + the routers, no S-layer top-k
    assert torch._dynamo.utils.counters["fx_indexcache"]["indexers_removed"] == 2


def test_dynamic_length_reuses_the_graph_and_decode_stays_correct():
    model, oracle = model_pair(TINY)
    oracle.set_index_cache_pattern("FSFS")
    compiled = torch.compile(model, backend=CapturingBackend(index_topk_pattern="FSFS"))
    with torch.no_grad():
        for length in (24, 37):  # both longer than top-k; the second must not recompile
            tokens = torch.randint(0, TINY.vocab_size, (1, length))
            torch._dynamo.mark_dynamic(tokens, 1)
            torch.testing.assert_close(compiled(tokens), oracle(tokens))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1

        cache, oracle_cache = model.new_cache(2), oracle.new_cache(2)
        prompt = torch.randint(0, TINY.vocab_size, (2, 20))
        torch.testing.assert_close(compiled(prompt, cache, 0), oracle(prompt, oracle_cache, 0))
        for step in range(4):  # fewer keys than top-k at first, more later
            token = torch.randint(0, TINY.vocab_size, (2, 1))
            torch.testing.assert_close(compiled(token, cache, 20 + step), oracle(token, oracle_cache, 20 + step))
        # S layers read their F layer's indices in decode too: their own key caches are never read
        torch.testing.assert_close(cache.kv[0], oracle_cache.kv[0])
    assert all(r.pattern == "FSFS" for r in reports() if r.decisions)


def test_dropping_shared_indexer_cache_writes_saves_bytes_and_stays_correct():
    model, oracle = model_pair(TINY)
    oracle.set_index_cache_pattern("FSFS")
    options = {"index_topk_pattern": "FSFS", "drop_shared_indexer_cache_writes": True}
    with torch.no_grad():
        cache, oracle_cache = model.new_cache(1), oracle.new_cache(1)
        prompt = torch.randint(0, TINY.vocab_size, (1, 24))
        compiled = torch.compile(model, backend=indexcache_backend, options=options)
        torch.testing.assert_close(compiled(prompt, cache, 0), oracle(prompt, oracle_cache, 0), rtol=1e-4, atol=1e-4)
    (report,) = reports()
    shared = [d for d in report.decisions if d.action == "shared"]
    # each S layer skips writing 24 rows of index_head_dim fp32 keys
    assert [d.cache_bytes_saved for d in shared] == [24 * TINY.index_head_dim * 4] * 2
    assert torch.count_nonzero(cache.index_k[1]) == 0 and torch.count_nonzero(cache.index_k[0]) > 0
    torch.testing.assert_close(cache.kv, oracle_cache.kv, rtol=1e-4, atol=1e-4)


class TinyDSABlock(torch.nn.Module):
    """A minimal DSA block: ReLU(q·k) scores, top-k, attention over the selected tokens."""

    def __init__(self, dim: int = 16, topk: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.topk = topk

    def indices(self, x):
        score = torch.relu(self.q(x) @ self.k(x).transpose(-1, -2))
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        return score.masked_fill(causal, float("-inf")).topk(self.topk, dim=-1).indices

    def forward(self, x, shared=None):
        idx = self.indices(x) if shared is None else shared
        picked = torch.gather(self.v(x).unsqueeze(1).expand(-1, x.shape[1], -1, -1), 2,
                              idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
        return x + picked.mean(2), idx


class BrokenStack(torch.nn.Module):
    """Four DSA blocks with a graph break between the second and third: two graphs."""

    def __init__(self, pattern=None):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(TinyDSABlock() for _ in range(4))
        self.pattern = pattern

    def step(self, i, x, last):
        shared = self.pattern is not None and self.pattern[i] == "S"
        x, idx = self.layers[i](x, last if shared else None)
        return x, (last if shared else idx)

    def forward(self, x):  # unrolled: dynamo cannot resume a graph break inside a loop
        x, last = self.step(0, x, None)
        x, last = self.step(1, x, last)
        torch._dynamo.graph_break()
        x, last = self.step(2, x, last)
        x, last = self.step(3, x, last)
        return x


def test_graph_break_between_f_and_s_leaves_the_s_layer_and_says_so():
    model = BrokenStack()
    backend = CapturingBackend(index_topk_pattern="FSSF")
    x = torch.randn(1, 10, 16)
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(x)
    decisions = {d.layer: d for r in backend.reports for d in r.decisions}
    assert {k: d.action for k, d in decisions.items()} == {0: "computed", 1: "shared", 2: "left as is", 3: "computed"}
    assert "its F layer 0 has no indexer site in this graph" in decisions[2].note
    oracle = BrokenStack(pattern="FSFF")  # what ran: layer 2 computed its own indices
    oracle.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(got, oracle(x))


def test_graph_break_inside_a_layer_compiles_layers_alone_and_rewrites_nothing():
    model, original = model_pair(TINY)
    layer = model.layers[2]
    original_forward = type(layer).forward

    def forward_with_break(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return original_forward(self, *args, **kwargs)

    layer.forward = forward_with_break.__get__(layer)
    backend = CapturingBackend(index_topk_pattern="FSSF")
    tokens = torch.randint(0, TINY.vocab_size, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(tokens), original(tokens))
    assert sum(r.indexers_removed for r in backend.reports) == 0


def _regional(model):
    region = torch.compiler.nested_compile_region
    shared_body = region(type(model.layers[0]).forward)  # one body for every layer
    for layer in model.layers:
        layer.forward = shared_body.__get__(layer)
    return model


@pytest.mark.skipif(not hasattr(torch.compiler, "nested_compile_region"), reason="no nested_compile_region")
def test_nested_compile_region_without_s_layers_is_left_alone():
    """Nothing to share: the graph is torch's own regional compile, and the report says the body was left."""
    model, baseline = (_regional(m) for m in model_pair(TINY))
    backend = CapturingBackend(index_topk_pattern="FFFF")
    tokens = torch.randint(0, TINY.vocab_size, (1, 24))
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(tokens)
        want = torch.compile(baseline, backend="aot_eager", fullgraph=True)(tokens)
    torch.testing.assert_close(got, want)
    assert all(not r.regional for r in backend.reports)
    assert any("nested_compile_region" in note for r in backend.reports for note in r.other_notes)


@pytest.mark.skipif(not hasattr(torch.compiler, "nested_compile_region"), reason="no nested_compile_region")
def test_nested_compile_region_calls_switch_to_f_and_s_bodies():
    """Issue 14: F calls of the shared layer body return their indices, S calls take them (regional.py).
    The output is checked against the oracle in test_regional.py, on a model whose layers really are one
    body: one body for this model's dense and MoE layers is not the model (torch's own regional compile
    already differs from eager here)."""
    from fx_indexcache.crossgraph.runtime import CallAction

    model = _regional(model_pair(TINY)[0])
    backend = CapturingBackend(index_topk_freq=2, index_skip_topk_offset=1)
    config = backend.config
    pattern = "".join(config.layer_kind(i) for i in range(len(model.layers)))
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(torch.randint(0, TINY.vocab_size, (1, 24)))
    calls = [call for r in backend.reports for call in r.regional]
    assert "S" in pattern and [call.action is CallAction.READ for call in calls] == [c == "S" for c in pattern]
    gm = backend.graphs[-1]
    bodies = {str(n.args[0].target) for n in gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph}
    # each original body becomes at most one F and one S body (torch 2.13 traces this model's layers as one body,
    # torch 2.11 as two: dense and MoE), so the layers keep sharing compiled code within each kind
    per_original = collections.Counter(name.rsplit("_indexcache_", 1)[0] for name in bodies)
    assert any(name.endswith("_indexcache_s") for name in bodies) and max(per_original.values()) <= 2, bodies


FX_CACHE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from fx_indexcache import indexcache_backend, reports
    from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel
    pattern = sys.argv[1]
    config = DSAModelConfig.tiny(num_layers=2, first_k_dense_layers=1)  # small: three processes compile it
    model, oracle = ReferenceDSAModel(config), ReferenceDSAModel(config)
    oracle.set_index_cache_pattern(pattern)
    tokens = torch.randint(0, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = torch.compile(model, backend=indexcache_backend, options={"index_topk_pattern": pattern})(tokens)
        diff = (got - oracle(tokens)).abs().max().item()
    counters = torch._dynamo.utils.counters["inductor"]
    rewritten = sum(1 for r in reports() if r.decisions)
    cached = any("FX graph cache" in note for r in reports() for note in r.other_notes)
    print(json.dumps({"diff": diff, "pass_ran": rewritten, "cached": cached, "hits": counters["fxgraph_cache_hit"]}))
    """
)


def test_fx_graph_cache_never_serves_a_graph_rewritten_under_another_pattern(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="1", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "run.py"
    script.write_text(FX_CACHE_SCRIPT)

    def run(pattern):
        out = subprocess.run([sys.executable, str(script), pattern], env=env, capture_output=True, text=True,
                             timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, other, again = run("FS"), run("FF"), run("FS")
    for result in (first, other, again):
        assert result["diff"] < 1e-4
    assert first["pass_ran"] == 1 and other["pass_ran"] == 1  # a new pattern is a cache miss
    assert again["hits"] >= 1 and again["pass_ran"] == 0  # the same pattern may be served from cache
    assert again["cached"] and not first["cached"]  # ... and the report says so


SPAN_CACHE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    from dsa_programs import Block, inputs
    from fx_indexcache import indexcache_backend, reports

    class Span(nn.Module):  # one class, run over layers [start, end): two pipeline stages, say
        def __init__(self, start, end):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.layers = nn.ModuleList(Block(gen) for _ in range(4))
            self.start, self.end = start, end

        def forward(self, x, pattern=None):
            last = None
            for i in range(self.start, self.end):
                if pattern is None or pattern[i] == "F" or last is None:
                    last = self.layers[i].indexer(x)
                x = self.layers[i](x, last)
            return x

    start, end = int(sys.argv[1]), int(sys.argv[2])
    pattern = "FSFF"
    span = Span(start, end).eval()
    with torch.no_grad():
        got = torch.compile(span, backend=indexcache_backend, options={"index_topk_pattern": pattern})(inputs())
        diff = (got - span(inputs(), pattern)).abs().max().item()
    counters = torch._dynamo.utils.counters["inductor"]
    rewritten = sum(1 for r in reports() if r.decisions)
    print(json.dumps({"diff": diff, "pass_ran": rewritten, "hits": counters["fxgraph_cache_hit"]}))
    """
)


def test_fx_graph_cache_never_serves_one_span_of_layers_for_another(tmp_path):
    """Two spans of one model class compile to the same code; only the module paths say which layers run. Layers
    2 and 3 are both F under FSFF: served layers 0 and 1's rewrite (FS), layer 3 would read layer 2's indices."""
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="1", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    script = tmp_path / "span.py"
    script.write_text(SPAN_CACHE_SCRIPT)

    def run(start, end):
        out = subprocess.run([sys.executable, str(script), str(start), str(end)], env=env, capture_output=True,
                             text=True, timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, other, again = run(0, 2), run(2, 4), run(0, 2)
    for result in (first, other, again):
        assert result["diff"] < 1e-4, result
    assert first["pass_ran"] == 1 and other["pass_ran"] == 1  # another span is a cache miss
    assert again["hits"] >= 1 and again["pass_ran"] == 0  # the same span may be served from cache


def test_uuid_covers_the_config():
    from fx_indexcache import IndexCachePass

    a = IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_freq=4), context=KEYED).uuid()
    b = IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_freq=2), context=KEYED).uuid()
    c = IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_freq=4), context=KEYED).uuid()
    assert a != b and a == c
    # the graph's numbers: another span of layers is another key; a pass installed by hand cannot tell, so it has none
    other_span = IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_freq=4),
                                context=dataclasses.replace(KEYED, numbering_digest="0123abcd")).uuid()
    assert other_span not in (a, None)
    assert IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_freq=4)).uuid() is None


def test_backend_is_registered_by_name_after_install():
    import importlib.metadata

    try:
        importlib.metadata.distribution("fx-indexcache")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fx-indexcache is not installed (./run installs it); entry points need an install")
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("indexcache") is indexcache_backend
    model, oracle = model_pair(TINY)
    oracle.set_index_cache_pattern("FSFS")
    tokens = torch.randint(0, TINY.vocab_size, (1, 24))
    with torch.no_grad():
        got = torch.compile(model, backend="indexcache", options={"index_topk_pattern": "FSFS"})(tokens)
        torch.testing.assert_close(got, oracle(tokens), rtol=1e-4, atol=1e-4)
    assert reports()[-1].indexers_removed == 2


def test_exported_reference_model_rewritten_equals_the_oracle():
    from fx_indexcache import apply_index_cache_to_exported_program

    model, oracle = model_pair(TINY)
    oracle.set_index_cache_pattern("FSSF")
    tokens = torch.randint(0, TINY.vocab_size, (2, 24))
    with torch.no_grad():
        program = torch.export.export(model, (tokens,), strict=False)
        report = apply_index_cache_to_exported_program(program, index_topk_pattern="FSSF")
        got = program.module()(tokens)
        torch.testing.assert_close(got, oracle(tokens))
    assert report.pattern == "FSSF" and report.indexers_removed == 2
    topk = [n for n in program.graph.nodes if n.target == torch.ops.aten.topk.default]
    assert len(topk) == 2 + report.router_topk
