"""transformers' generate() recipe on CUDA, with Inductor and CUDA graphs.

The recipe is ``model.forward = torch.compile(model.forward, backend=IndexCacheBackend(...),
mode="reduce-overhead")``, then a static cache. For transformers' DSA models, the greedy tokens must equal the
hand-written IndexCache oracle, and the logits must match it. Every compiled graph (prefill, decode, the dynamic
prefill a second prompt length makes) must have its S layers removed. The cudagraph trees must record the graphs
(no skip), and three prompt lengths must compile three graphs. The cache comes from ``prepared_static_cache``
(transformers 5.17 with torch 2.11 cannot trace the lazy allocation of the indexer cache; see that module).
``disable_compile=True`` keeps transformers from compiling its own decode step around ours. The last test runs that
combination too: it failed once on the H200 in session 6 (torch 2.11, transformers 5.17), its cause not captured.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from gpu_marks import needs_gpu

pytestmark = needs_gpu

PATTERN = "FSS"
PROMPTS = (9, 13, 16)
NEW_TOKENS = 4


def _runs(model, prompts, cache, **kwargs):
    outs = []
    with torch.no_grad():
        for ids in prompts:
            cache.reset()
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache,
                                 return_dict_in_generate=True, output_logits=True, **kwargs)
            outs.append((out.sequences, torch.stack(out.logits)))
    return outs


@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa"])
def test_static_cache_recipe_under_cuda_graphs(name):
    import hf_oracle as H

    from fx_indexcache import IndexCacheBackend, prepared_static_cache

    torch._dynamo.reset()
    tiny = H.TINY_DSA_MODELS[name]()
    model = tiny.model.cuda()
    prompts = [tiny.make_inputs(n, seed=i)["input_ids"].cuda() for i, n in enumerate(PROMPTS)]
    cache = prepared_static_cache(model, 1, max(PROMPTS) + NEW_TOKENS + 1)
    untouched = _runs(model, prompts, cache, disable_compile=True)
    with tiny.oracle(PATTERN) as sources:
        expected = _runs(model, prompts, cache, disable_compile=True)
    assert sources == {1: 0, 2: 0}
    # the pattern must change the logits, or equality with the oracle would prove nothing
    assert not all(torch.allclose(a[1], b[1]) for a, b in zip(untouched, expected))

    backend = IndexCacheBackend(index_topk_pattern=PATTERN)
    model.forward = torch.compile(model.forward, backend=backend, mode="reduce-overhead")
    counters.clear()
    got = _runs(model, prompts, cache, disable_compile=True)
    removed = [r.indexers_removed for r in backend.reports]
    assert len(removed) == 3 and set(removed) == {2}, [r.format() for r in backend.reports]
    for (tokens, logits), (want_tokens, want_logits) in zip(got, expected):
        assert torch.equal(tokens, want_tokens), (tokens.tolist(), want_tokens.tolist())
        torch.testing.assert_close(logits, want_logits, rtol=2e-3, atol=2e-3)
    # prefill, decode, dynamic prefill: none per length or token
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_transformers_own_decode_compile_around_ours():
    """generate() without ``disable_compile``: on CUDA with a static cache transformers compiles its decode step
    (Inductor, reduce-overhead) around the forward compiled with our backend. The forward keeps its backend, so
    tokens still equal the oracle's (session 6 saw this fail once, cause not captured; session 7 ran it)."""
    import hf_oracle as H

    from fx_indexcache import IndexCacheBackend, prepared_static_cache

    torch._dynamo.reset()
    tiny = H.TINY_DSA_MODELS["deepseek_v32"]()
    model = tiny.model.cuda()
    prompts = [tiny.make_inputs(n, seed=i)["input_ids"].cuda() for i, n in enumerate(PROMPTS[:2])]
    cache = prepared_static_cache(model, 1, max(PROMPTS) + NEW_TOKENS + 1)
    with tiny.oracle(PATTERN):
        expected = _runs(model, prompts, cache, disable_compile=True)
    backend = IndexCacheBackend(index_topk_pattern=PATTERN)
    model.forward = torch.compile(model.forward, backend=backend, mode="reduce-overhead")
    with torch._inductor.config.patch(fx_graph_cache=False):  # the first test's graphs would come from the cache
        got = _runs(model, prompts, cache)
    assert hasattr(model, "_compiled_call")  # transformers did compile its decode step
    assert backend.reports and all(r.indexers_removed == 2 for r in backend.reports), [
        r.format() for r in backend.reports]
    for (tokens, logits), (want_tokens, want_logits) in zip(got, expected):
        assert torch.equal(tokens, want_tokens), (tokens.tolist(), want_tokens.tolist())
        torch.testing.assert_close(logits, want_logits, rtol=2e-3, atol=2e-3)
