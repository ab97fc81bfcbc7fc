"""State across graphs and calls is owned and proven (issue 25, failure classes 4-6 and the ledger).

* Indices an S layer hands back never alias the buffer a later F layer publishes into (class 4).
* A read across graphs is proven only inside one call of the model's forward, on its first pass over the
  layers: a span of layers run through another method, or two micro-batches interleaved, computes (class 5).
* Training graphs are left as they are, so a backward's recomputation under activation checkpointing agrees
  with the forward (class 6).
* Cache-write choices are kept per model class in the backend's session: another model never trips them.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fx_indexcache as fic
from cross_graph_programs import D, LoopDecoder, SegmentDecoder
from dsa_programs import ModuleDSA, inputs
from fx_indexcache.crossgraph.runtime import CallAction, Fallback

N = 4


def _randn(*shape, seed: int):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- class 4: held index tensors
class HoldingDecoder(LoopDecoder):
    """Keeps every layer's indices and returns them: a model that reads earlier layers' indices later."""

    def forward(self, x, past=None, order=None):
        held = []
        for i in range(len(self.layers)):
            x, indices = self.layers[i](x, None)
            held.append(indices)
            torch._dynamo.graph_break()
        return x, held


def _oracle_indices(model, x, uses):
    cache = {}
    for i in range(len(model.layers)):
        shared = cache[uses[i]] if uses[i] != i else None
        x, cache[i] = model.layers[i](x, None, shared)
    return [cache[i] for i in range(len(model.layers))]


@pytest.mark.parametrize("pattern", ["FSFS", "FSSF"])
def test_indices_an_s_layer_returns_survive_later_publishes(pattern):
    model = HoldingDecoder(N)
    backend = fic.IndexCacheEagerBackend(index_topk_pattern=pattern)
    compiled = torch.compile(model, backend=backend)
    uses = [0, 0, 2, 2] if pattern == "FSFS" else [0, 0, 0, 3]
    with torch.no_grad():
        for seed in (1, 2):  # the second call publishes into the same buffers again
            x = _randn(2, 5, D, seed=seed)
            _, held = compiled(x)
            want = _oracle_indices(model, x, uses)
            for layer in range(N):
                torch.testing.assert_close(held[layer], want[layer], rtol=0, atol=0, msg=f"layer {layer}")
    reads = {c.layer for c in fic.layer_calls(model, backend) if c.action is CallAction.READ}
    assert reads == {i for i in range(N) if uses[i] != i}  # the S layers did read (not vacuous)


# ----------------------------------------------------------------------------- class 5: what one call is
def test_a_compiled_method_that_is_not_forward_never_reads_another_batch(monkeypatch):
    """``torch.compile(model.run)`` over spans, two micro-batches interleaved as a pipeline schedule runs them."""
    model = SegmentDecoder(N)
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSSS")
    run = torch.compile(model.run, backend=backend)
    a, b = _randn(2, 5, D, seed=1), _randn(2, 5, D, seed=2)
    with torch.no_grad():
        a1, b1 = run(a, None, 0, 2), run(b, None, 0, 2)
        a2, b2 = run(a1, None, 2, 4), run(b1, None, 2, 4)
        in_graph = [0, 0, 2, 3]  # the first span shares inside its graph; the second may not read across
        torch.testing.assert_close(a2, model.oracle(a, in_graph), rtol=0, atol=0)
        torch.testing.assert_close(b2, model.oracle(b, in_graph), rtol=0, atol=0)
        assert not torch.equal(model.oracle(a, in_graph), model.oracle(a, [0, 0, 0, 0]))
    assert not any(c.action is CallAction.READ for c in fic.layer_calls(model, backend))


def test_a_timeline_outside_the_model_forward_refuses_every_read():
    from fx_indexcache.crossgraph.runtime import Timeline

    timeline = Timeline()
    timeline.begin(0)
    timeline.published[0] = object()
    assert timeline.readable(0, 1) is Fallback.NO_FORWARD_CALL
    timeline.new_forward()
    timeline.begin(0)
    timeline.published[0] = marker = object()
    assert timeline.readable(0, 1) is marker
    timeline.begin(1)
    timeline.begin(0)  # a lower layer again in the same call: a second pass (another micro-batch)
    timeline.published[0] = object()
    assert timeline.readable(0, 1) is Fallback.SECOND_PASS
    timeline.end_forward()
    assert timeline.readable(0, 1) is Fallback.NO_FORWARD_CALL


class InterleavedDecoder(SegmentDecoder):
    """One forward call that runs two micro-batches through the layers interleaved."""

    def forward(self, a, b):
        a = self.run(a, None, 0, 2)
        torch._dynamo.graph_break()
        b = self.run(b, None, 0, 2)
        torch._dynamo.graph_break()
        a = self.run(a, None, 2, 4)
        torch._dynamo.graph_break()
        return a, self.run(b, None, 2, 4)


def test_micro_batches_interleaved_in_one_forward_compute_instead_of_reading():
    model = InterleavedDecoder(N)
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSSS")
    compiled = torch.compile(model, backend=backend)
    a, b = _randn(2, 5, D, seed=1), _randn(2, 5, D, seed=2)
    with torch.no_grad():
        got_a, got_b = compiled(a, b)
    torch.testing.assert_close(got_a, model.oracle(a, [0, 0, 2, 3]), rtol=0, atol=0)
    torch.testing.assert_close(got_b, model.oracle(b, [0, 0, 2, 3]), rtol=0, atol=0)
    fallbacks = {c.fallback for c in fic.layer_calls(model, backend) if c.layer in (2, 3)}
    assert fallbacks == {Fallback.SECOND_PASS}


def test_the_same_spans_in_one_forward_call_do_read_across_the_break():
    """The check is not vacuous: one micro-batch through the same spans reads layer 0's indices."""
    model = SegmentDecoder(N)
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSSS")
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, model.oracle(x, [0, 0, 0, 0]), rtol=0, atol=0)
    assert {c.layer for c in fic.layer_calls(model, backend) if c.action is CallAction.READ} == {2, 3}


# ----------------------------------------------------------------------------- class 6: training
class CheckpointedDSA(ModuleDSA):
    def forward(self, x, uses=None):
        for i in range(self.n):
            x = checkpoint(self._layer, i, x, use_reentrant=False)
        return x

    def _layer(self, i, x):
        return self.layers[i](x, self.layers[i].indexer(x))


@pytest.mark.parametrize("backend_class", [fic.IndexCacheEagerBackend, fic.IndexCacheBackend])
def test_activation_checkpointing_trains_the_untouched_model_and_says_so(backend_class, caplog):
    compiled_model, eager_model = CheckpointedDSA(4), CheckpointedDSA(4)
    backend = backend_class(index_topk_pattern="FSFS")
    x = inputs()
    compiled = torch.compile(compiled_model, backend=backend)
    with caplog.at_level("WARNING", logger="fx_indexcache"):
        compiled(x).square().sum().backward()
    eager_model(x).square().sum().backward()
    grads = dict(eager_model.named_parameters())
    for name, param in compiled_model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-5, atol=1e-5, msg=name)
    decided = [r for r in backend.reports if r.decisions]
    assert decided and all(r.indexers_removed == 0 for r in decided)
    assert all("training graph" in d.note for r in decided for d in r.decisions)
    assert any("training graph" in r.getMessage() for r in caplog.records)
    with torch.no_grad():  # the same compiled model under no_grad: an inference graph, which shares
        compiled(x)
    assert any(r.indexers_removed == 2 for r in backend.reports)


# ----------------------------------------------------------------------------- cache-write ledger
def _cached(model):
    from test_pass_safety import _caches

    return model, _caches()


def test_another_model_class_never_trips_the_first_one_s_cache_write_choices():
    from test_pass_safety import CachedStack

    class OtherStack(CachedStack):  # another model class with the same config and the same layer keys
        pass

    options = {"index_topk_pattern": "FSF", "drop_shared_indexer_cache_writes": True}
    with torch.no_grad():
        first, caches = _cached(CachedStack())
        torch.compile(first, backend=fic.indexcache_eager_backend, options=options)(inputs(1), caches, 0)
        assert torch.count_nonzero(caches[1][0]) == 0  # layer 1's writes were dropped (the eager backend too)
        second, caches = _cached(OtherStack())
        compiled = torch.compile(second, backend=fic.indexcache_eager_backend, options=options)
        compiled(inputs(1), caches, 0, weigh=True)  # its layer 1 computes: no conflict with the other class
        assert torch.count_nonzero(caches[1][0]) > 0
        same_class, caches = _cached(CachedStack())
        with pytest.raises(Exception, match="earlier graph of the same model dropped"):  # one class: still guarded
            torch.compile(same_class, backend=fic.indexcache_eager_backend, options=options)(
                inputs(1), caches, 0, weigh=True)


# ----------------------------------------------------------------------------- bad input at the door
def test_a_misspelt_backend_key_fails_at_construction_naming_the_key():
    with pytest.raises(ValueError, match=r"'index_topk_frq' \(did you mean 'index_topk_freq'\?\)"):
        fic.IndexCacheBackend(index_topk_frq=2)
    with pytest.raises(ValueError, match=r"'triton\.cudagraph' \(did you mean 'triton\.cudagraphs'\?\)"):
        fic.IndexCacheBackend(**{"triton.cudagraph": True})
    with pytest.raises(ValueError, match="unknown key 'max_autotune'"):
        fic.IndexCacheEagerBackend(max_autotune=True)  # an Inductor key means nothing to the eager backend
    fic.IndexCacheBackend(max_autotune=False, index_topk_freq=2)  # a real Inductor key is fine


def test_keys_given_mean_on_everywhere():
    config = fic.IndexCacheConfig(index_topk_pattern="FS")
    assert config.use_index_cache and config.switch.value.startswith("implied")
    assert not fic.IndexCacheConfig(index_topk_pattern="FS", use_index_cache=False).use_index_cache
    assert fic.IndexCachePass({"index_topk_pattern": "FS"}).config == config
    with pytest.raises(ValueError, match="did you mean 'index_topk_pattern'"):
        fic.IndexCachePass({"index_topk_patern": "FS"})
    with pytest.raises(TypeError, match="must be an IndexCacheConfig, a dict"):
        fic.IndexCachePass(["FS"])


@pytest.mark.parametrize(("value", "expected"), [("off", False), ("FALSE", False), (" no ", False), ("0", False),
                                                  ("on", True), ("Yes", True), ("1", True), ("", True)])
def test_cuda_topk_switch_reads_the_usual_spellings(monkeypatch, value, expected):
    from fx_indexcache.envvars import CUDA_TOPK, env_flag

    monkeypatch.setenv(CUDA_TOPK, value)
    assert env_flag(CUDA_TOPK, default=True) is expected


def test_cuda_topk_switch_refuses_other_values_naming_them(monkeypatch):
    from fx_indexcache.envvars import CUDA_TOPK, env_flag

    monkeypatch.setenv(CUDA_TOPK, "disabled")
    with pytest.raises(ValueError, match=r"FX_INDEXCACHE_CUDA_TOPK='disabled' is not allowed.*0, false, no, off"):
        env_flag(CUDA_TOPK, default=True)
