"""transformers' generate() with IndexCache: the static-cache recipe (prefill and decode rewritten) and the
compile_config path (decode only, said so).

The recipe: ``model.forward = torch.compile(model.forward, backend=<IndexCache backend>, mode="reduce-overhead")``,
then ``generate(..., cache_implementation="static")``. For every supported DSA model with a static cache, greedy
tokens and logits equal the hand-written oracle (indexer modules patched), every compiled graph (prefill, decode,
the dynamic prefill a second prompt length makes) has its S layers removed, and three prompt lengths times several
tokens compile three graphs: none per length, none per token. ``IndexCacheEagerBackend`` keeps the compiles cheap
on CPU (the mode is Inductor's and has nothing to tune there); the Inductor backend takes the same path.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from fx_indexcache import IndexCacheEagerBackend
import hf_oracle as H

_SHARED = {n: spec for n, spec in H.SPECS.items() if spec.limitation is None and spec.decode_limitation is None}
STATIC = [n for n, spec in _SHARED.items() if spec.no_static_cache is None]
NO_STATIC = [n for n, spec in _SHARED.items() if spec.no_static_cache is not None]
PATTERN = "FSS"  # 3 tiny layers: layers 1 and 2 reuse layer 0's indices
PROMPTS = (9, 13, 16)  # all longer than the tiny models' top-k (4)
NEW_TOKENS = 4


def _generate(model, input_ids, **kwargs):
    out = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static",
                         return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


def _runs(tiny, **kwargs):
    prompts = [tiny.make_inputs(n, seed=i)["input_ids"] for i, n in enumerate(PROMPTS)]
    with torch.no_grad():
        return [_generate(tiny.model, ids, **kwargs) for ids in prompts]


@pytest.mark.parametrize("name", STATIC)
def test_static_cache_recipe_applies_the_pattern_to_prefill_and_decode(name):
    tiny = H.TINY_DSA_MODELS[name]()
    untouched = _runs(tiny)
    with tiny.oracle(PATTERN) as sources:
        expected = _runs(tiny)
    assert sources == {1: 0, 2: 0}
    # the pattern must change the logits, or equality with the oracle would prove nothing
    assert not all(torch.allclose(a[1], b[1]) for a, b in zip(untouched, expected))

    backend = IndexCacheEagerBackend(index_topk_pattern=PATTERN)
    tiny.model.forward = torch.compile(tiny.model.forward, backend=backend, mode="reduce-overhead")
    counters.clear()
    got = _runs(tiny)
    for (tokens, logits), (want_tokens, want_logits) in zip(got, expected):
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    # prefill (static), decode, prefill (dynamic after the second length): no graph per length or per token
    assert counters["stats"]["unique_graphs"] == 3
    assert len(backend.reports) == 3
    for report in backend.reports:
        assert report.pattern == PATTERN and report.indexers_removed == 2


def test_recipe_survives_transformers_own_decode_compile():
    """On CUDA generate() also compiles ``__call__`` for decoding (here forced with ``_compile_all_devices``): the
    compiled forward inside it keeps its own backend, so decode still runs IndexCache."""
    from transformers import CompileConfig

    tiny = H.TINY_DSA_MODELS["deepseek_v32"]()
    with tiny.oracle(PATTERN):
        expected = _runs(tiny)
    outer_graphs = []
    outer = CompileConfig(backend=lambda gm, inputs, **kw: outer_graphs.append(gm) or gm.forward, mode="default")
    outer._compile_all_devices = True
    backend = IndexCacheEagerBackend(index_topk_pattern=PATTERN)
    tiny.model.forward = torch.compile(tiny.model.forward, backend=backend, mode="reduce-overhead")
    got = _runs(tiny, compile_config=outer)
    assert hasattr(tiny.model, "_compiled_call")  # transformers did compile its decode step
    for (tokens, logits), (want_tokens, want_logits) in zip(got, expected):
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert all(not any(n.op == "call_function" for n in gm.graph.nodes) for gm in outer_graphs)
    assert len(backend.reports) == 3 and all(r.indexers_removed == 2 for r in backend.reports)


def test_compile_config_path_is_decode_only_and_says_so_once(caplog):
    from transformers import CompileConfig

    tiny = H.TINY_DSA_MODELS["deepseek_v32"]()
    backend = IndexCacheEagerBackend(index_topk_pattern=PATTERN)
    compile_config = CompileConfig(backend=backend)  # mode "reduce-overhead", transformers' default
    compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked
    with caplog.at_level(logging.WARNING, logger="fx_indexcache"):
        _runs(tiny, compile_config=compile_config)
    warnings = [r.getMessage() for r in caplog.records if "compiled only the decode step" in r.getMessage()]
    assert len(warnings) == 1 and "DeepseekV32ForCausalLM" in warnings[0] and "WITHOUT IndexCache" in warnings[0]
    # transformers copied the config; the reports are still on the object the user holds
    assert backend.reports and all(r.indexers_removed == 2 for r in backend.reports)
    assert all(any("prefill runs eagerly" in note for note in r.other_notes) for r in backend.reports)


@pytest.mark.parametrize("name", NO_STATIC)
def test_models_without_a_static_cache_are_the_documented_ones(name):
    tiny = H.TINY_DSA_MODELS[name]()
    with pytest.raises(KeyError):
        _runs(tiny)


@pytest.mark.parametrize("name", STATIC)
def test_prepared_static_cache_allocates_every_buffer_before_the_first_compiled_call(name):
    from fx_indexcache import prepared_static_cache

    tiny = H.TINY_DSA_MODELS[name]()
    cache = prepared_static_cache(tiny.model, batch_size=2, max_cache_len=24)
    indexed = [layer for layer in cache.layers if hasattr(layer, "indexer_keys")]
    assert indexed, "no indexer cache layer: the check below would pass vacuously"
    for layer in cache.layers:
        assert layer.is_initialized and layer.keys.shape[0] == 2 and layer.keys.shape[-2] == 24
    for layer in indexed:
        assert layer.is_indexer_initialized and tuple(layer.indexer_keys.shape[:2]) == (2, 24)
        assert int(layer.indexer_cumulative_length) == 0 and not layer.indexer_keys.any()  # reset after priming
    ids = tiny.make_inputs(9, seed=0)["input_ids"].expand(2, -1)
    with torch.no_grad():
        got = tiny.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache)
        want = tiny.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want)


def test_prepared_static_cache_names_a_bad_size():
    from fx_indexcache import prepared_static_cache

    tiny = H.TINY_DSA_MODELS["deepseek_v32"]()
    with pytest.raises(ValueError, match=r"max_cache_len=0, expected a positive int"):
        prepared_static_cache(tiny.model, batch_size=1, max_cache_len=0)
