"""Issue 14, item 2: regional compilation (one ``nested_compile_region`` body per layer) under IndexCache.

F calls switch to a body that also returns its indices, S calls to a body without the indexer that takes
them; the output equals the hand-written oracle, in prefill (two lengths) and decode, batch 2.
"""

from __future__ import annotations

import pytest
import torch

import fx_indexcache as fic
from cross_graph_programs import D, RegionDecoder
from fx_indexcache.crossgraph.runtime import CallAction

pytestmark = pytest.mark.skipif(not hasattr(torch.compiler, "nested_compile_region"),
                                reason="this torch has no torch.compiler.nested_compile_region")
N = 4


def _uses(pattern: str) -> list[int]:
    config = fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern)
    return [config.source_layer(i) if config.layer_kind(i) == "S" else i for i in range(len(pattern))]


def _randn(*shape, seed: int):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern, select", [("FSFS", "topk"), ("FSSS", "topk"), ("FFSF", "topk"), ("FSFS", "sort")])
def test_region_bodies_share_like_the_oracle(pattern, select):
    model = RegionDecoder(N)
    for layer in model.layers:
        layer.indexer.select = select  # "sort": the bodies' site is a sort cut to K
    backend = fic.IndexCacheEagerBackend(index_topk_pattern=pattern)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    past = [_randn(2, 6, D, seed=10 + i) for i in range(N)]
    steps = [(_randn(2, 5, D, seed=1), None), (_randn(2, 7, D, seed=2), None), (_randn(2, 1, D, seed=3), past)]
    with torch.no_grad():
        for x, cache in steps:
            out = compiled(x, cache)
            expected = model.oracle(x, _uses(pattern), cache)
            assert not torch.equal(expected, model.oracle(x, list(range(N)), cache))
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for report in backend.reports:
        actions = [(call.layer, call.action) for call in report.regional]
        assert actions == [(i, CallAction.READ if c == "S" else CallAction.PUBLISHED) for i, c in enumerate(pattern)]
        assert len({call.body for call in report.regional}) == 2  # one F body and one S body, each shared
    assert len(backend.reports) == 3


def test_region_calls_out_of_order_leave_the_s_layer_computing():
    """Layer 1 (S) called before layer 0 (its F): it keeps the original body."""
    model = RegionDecoder(N)
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x, None, [1, 0, 2, 3])
        torch.testing.assert_close(out, model.oracle(x, [0, 1, 2, 2], None, [1, 0, 2, 3]), rtol=0, atol=0)
    (report,) = backend.reports
    calls = {call.layer: call for call in report.regional}
    assert calls[1].action is CallAction.COMPUTED and "after" in calls[1].note
    assert calls[3].action is CallAction.READ


def test_region_bodies_of_different_selections_never_share():
    """Layers 0 and 2 select by top-k, 1 and 3 by a sort cut to K (two bodies): the S layers' F layers are of the
    other kind, so they keep their own body and say why; the output is the model's own."""
    model = RegionDecoder(N)
    for i, layer in enumerate(model.layers):
        layer.indexer.select = "sort" if i % 2 else "topk"
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x, None)
        torch.testing.assert_close(out, model.oracle(x, list(range(N)), None), rtol=0, atol=0)
    (report,) = backend.reports
    calls = {call.layer: call for call in report.regional}
    for layer in (1, 3):
        assert calls[layer].action is CallAction.COMPUTED and "aten.sort" in calls[layer].note, calls[layer]


def test_region_with_inductor_equals_the_oracle():
    model = RegionDecoder(N)
    backend = fic.IndexCacheBackend(index_topk_pattern="FSFS")
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(out, model.oracle(x, _uses("FSFS")), rtol=1e-5, atol=1e-5)
    assert [call.action for call in backend.reports[-1].regional] == [CallAction.PUBLISHED, CallAction.READ] * 2


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(pattern=st.sampled_from(["FSSS", "FSFS", "FFSF"]),
       order=st.lists(st.integers(0, N - 1), min_size=1, max_size=N, unique=True))
def test_region_calls_in_any_order_read_only_an_earlier_f_call(pattern, order):
    torch._dynamo.reset()
    config = fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern)
    model = RegionDecoder(N)
    backend = fic.IndexCacheEagerBackend(index_topk_pattern=pattern)
    x = _randn(2, 5, D, seed=len(order))
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x, None, order)
        calls = {call.layer: call for report in backend.reports for call in report.regional}
        read = {layer for layer, call in calls.items() if call.action is CallAction.READ}
        for layer in read:
            assert order.index(config.source_layer(layer)) < order.index(layer)
        expected_read = {i for i in order if config.layer_kind(i) == "S" and config.source_layer(i) in order
                         and order.index(config.source_layer(i)) < order.index(i)}
        assert read == expected_read
        uses = [config.source_layer(i) if i in read else i for i in range(N)]
        torch.testing.assert_close(out, model.oracle(x, uses, None, order), rtol=0, atol=0)
