"""Issue 14, part 1: numbered graphs split by a graph break share across the break.

A break in the model's top frame (``SegmentDecoder``: a break between layer segments; ``FunctionalDecoder``:
one break, layers as plain functions) makes graphs the pass numbers. The first graph's last F layer
publishes its indices; the next graph's leading S layers read them when the host check passes. Each test
compares with the hand-written oracle exactly (eager ATen backend), asserts from ``layer_calls`` that the
leading S layers really read (not vacuous), and that a failed check gives the untouched layer.
"""

from __future__ import annotations

import pytest
import torch

import fx_indexcache as fic
from fx_indexcache.detection.registry import UnknownLayerIndex
from cross_graph_programs import D, FunctionalDecoder, SegmentDecoder
from fx_indexcache.report.sharing import Sharing
from fx_indexcache.crossgraph.runtime import CallAction, Fallback

N = 4


def _config(pattern: str) -> fic.IndexCacheConfig:
    return fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern)


def _uses(pattern: str, computing=()) -> list[int]:
    config = _config(pattern)
    return [config.source_layer(i) if config.layer_kind(i) == "S" and i not in computing else i
            for i in range(len(pattern))]


def _randn(*shape, seed: int):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _compile(model, pattern: str, backend_class=fic.IndexCacheEagerBackend):
    backend = backend_class(index_topk_pattern=pattern)
    return torch.compile(model, backend=backend), backend


def _segments(cuts) -> tuple[tuple[int, int], ...]:
    bounds = (0, *cuts, N)
    return tuple(zip(bounds, bounds[1:]))


def _leading(pattern: str, segments) -> set[int]:
    """The S layers whose F layer is in an earlier segment: the ones that read across the break."""
    config = _config(pattern)
    return {i for start, stop in segments[1:] for i in range(start, stop)
            if config.layer_kind(i) == "S" and config.source_layer(i) < start}


def _steps():
    """Prefill at two lengths (the second makes dynamic graphs), then two decode steps; batch 2."""
    past = [_randn(2, 6, D, seed=10 + i) for i in range(N)]
    return [(_randn(2, 5, D, seed=1), None), (_randn(2, 7, D, seed=2), None),
            (_randn(2, 1, D, seed=3), past), (_randn(2, 1, D, seed=4), past)]


@pytest.fixture(autouse=True)
def _room_for_every_segment_graph():
    """Three segments × (static, dynamic, decode) graphs of one ``run`` frame pass dynamo's default limit of 8,
    after which dynamo runs the frame eagerly (correct, every layer computing, but nothing to test)."""
    with torch._dynamo.config.patch(recompile_limit=32):
        yield


def _reads(model, backend) -> dict[int, int]:
    return {c.layer: c.source_layer for c in fic.layer_calls(model, backend) if c.action is CallAction.READ}


@pytest.mark.parametrize("pattern,cuts", [("FSSS", (1,)), ("FSSS", (2,)), ("FSSS", (3,)), ("FFSS", (3,)),
                                          ("FSFS", (1, 3)), ("FFSS", (1, 2))])
def test_a_break_between_numbered_graphs_equals_the_oracle(pattern, cuts):
    model, segments = SegmentDecoder(N), _segments(cuts)
    compiled, backend = _compile(model, pattern)
    leading = _leading(pattern, segments)
    assert leading  # every case here shares across a break
    with torch.no_grad():
        for x, past in _steps():
            out = compiled(x, past, segments)
            expected = model.oracle_segments(x, _uses(pattern), past, segments)
            assert not torch.equal(expected, model.oracle_segments(x, _uses(pattern, leading), past, segments))
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            assert _reads(model, backend) == {i: _config(pattern).source_layer(i) for i in leading}
    plans = [r.cross_graph for r in backend.reports if r.cross_graph is not None]
    assert any(p.active and p.numbered and p.reads for p in plans)
    assert any(p.active and p.numbered and p.publishes is not None for p in plans)


def test_a_break_where_the_next_layer_is_f_exchanges_nothing():
    model, segments = SegmentDecoder(N), _segments((2,))
    compiled, backend = _compile(model, "FSFS")
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, None, segments), model.oracle(x, _uses("FSFS")), rtol=0, atol=0)
    assert fic.layer_calls(model, backend) == [] and all(r.cross_graph is None for r in backend.reports)


@pytest.mark.parametrize("pattern", ["FSSS", "FFSS", "FSFS"])
def test_functional_layers_split_by_a_break_compute(pattern):
    """The first graph holds 3 indexers of a 4-layer model and no module paths: its order cannot prove which
    layers they are (a hybrid stack would look the same), so it computes and says why; the one-layer graph
    after the break finds no published source and computes too. Untouched, never shifted."""
    model = FunctionalDecoder(N, split=3)
    compiled, backend = _compile(model, pattern)
    with torch.no_grad():
        for x, past in _steps():
            out = compiled(x, past)
            torch.testing.assert_close(out, model.oracle(x, list(range(N)), past), rtol=0, atol=0)
            assert _reads(model, backend) == {}
    first = backend.reports[0]
    assert first.layer_index_unknown is UnknownLayerIndex.COUNT_MISMATCH and first.indexers_removed == 0


def test_functional_graph_of_several_unnumbered_layers_computes():
    """After a break at layer 2 neither graph can be numbered (2 of 4 indexers each, no paths): all compute."""
    model = FunctionalDecoder(N, split=2)
    compiled, backend = _compile(model, "FSSS")
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model.oracle(x, [0, 1, 2, 3]), rtol=0, atol=0)
    assert _reads(model, backend) == {}


def test_inductor_shares_across_a_numbered_break():
    """The middle graph reads layer 0's indices and publishes layer 2's: two buffers, never aliased inputs."""
    model, segments = SegmentDecoder(N), _segments((1, 3))
    compiled, backend = _compile(model, "FSFS", fic.IndexCacheBackend)
    with torch.no_grad():
        for seed in (1, 2):
            x = _randn(2, 5, D, seed=seed)
            out = compiled(x, None, segments)
            torch.testing.assert_close(out, model.oracle_segments(x, _uses("FSFS"), None, segments),
                                       rtol=1e-5, atol=1e-5)
            assert _reads(model, backend) == {1: 0, 3: 2}
    (timeline,) = backend.session.layer_map(model).timelines.values()
    assert timeline.published[0].indices.data_ptr() != timeline.published[2].indices.data_ptr()


@pytest.mark.parametrize("segments,fallback", [
    (((2, 4),), Fallback.NOT_PUBLISHED),  # the publishing graph is skipped
    (((2, 4), (0, 2)), Fallback.NOT_PUBLISHED),  # out of order: the reader runs first
    (((0, 1), (2, 4)), Fallback.NOT_CONSECUTIVE),  # layer 1 did not run in between
])
def test_a_failed_check_runs_the_graph_as_it_is(segments, fallback):
    model = SegmentDecoder(N)
    compiled, backend = _compile(model, "FSSS")
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        compiled(x, None, ((0, 2), (2, 4)))  # a full call first: indices published in an earlier call
        out = compiled(x, None, segments)
        order = [i for start, stop in segments for i in range(start, stop)]
        torch.testing.assert_close(out, model.oracle(x, _uses("FSSS", {2, 3}), None, order), rtol=0, atol=0)
    calls = {c.layer: c for c in fic.layer_calls(model, backend)}
    assert calls[2].action is CallAction.COMPUTED and calls[2].fallback is fallback


def test_another_cache_length_after_the_break_computes():
    model, segments = SegmentDecoder(N), _segments((2,))
    compiled, backend = _compile(model, "FSSS")
    x = _randn(2, 1, D, seed=1)
    past = [_randn(2, 6 if i < 2 else 9, D, seed=10 + i) for i in range(N)]
    with torch.no_grad():
        out = compiled(x, past, segments)
    torch.testing.assert_close(out, model.oracle(x, _uses("FSSS", {2, 3}), past), rtol=0, atol=0)
    assert {c.layer: c.fallback for c in fic.layer_calls(model, backend) if c.marked == "S"} == {
        2: Fallback.MISMATCH, 3: Fallback.MISMATCH}


def test_the_table_names_the_publishing_graph():
    model, segments = SegmentDecoder(N), _segments((2,))
    compiled, backend = _compile(model, "FSSS")
    with torch.no_grad():
        compiled(_randn(2, 5, D, seed=1), None, segments)
    rows = {row.layer: row for row in fic.layer_sharing(model, backend)}
    assert rows[0].publishes and rows[1].sharing is Sharing.INSIDE_GRAPH
    assert [rows[i].sharing for i in (2, 3)] == [Sharing.ACROSS_GRAPHS] * 2
    assert rows[2].source_graph == rows[0].graph != rows[2].graph
    text = "\n".join(r.format() for r in backend.reports)
    assert "publishes its indices for later graphs" in text and "read the indices of the last F layer that ran before them" in text


@pytest.mark.parametrize("backend", ["inductor", "eager"])
@pytest.mark.parametrize("layer_count_known", [True, False])
def test_the_graph_that_runs_has_the_fused_kernel(backend, layer_count_known, sites_on_cuda, kernel_ok, monkeypatch):
    """A whole-model graph whose layer count is known (its layer list has 4 blocks) is compiled once, and that
    graph, fused, is what runs. Where the count is unknown it also publishes its last F layer's indices for a
    possible next graph, so the wrapper runs a variant: that variant must be fused too (an H200 run once caught it
    running Inductor's unfused scoring while the report said both F layers were fused: 0.99x instead of 8.9x)."""
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    from fx_indexcache.integrations import graph_pass
    from indexer_stack import UnbatchedDSAStack

    if not layer_count_known:
        monkeypatch.setattr(graph_pass, "container_length", lambda model, container: None)
    torch.manual_seed(0)
    model = UnbatchedDSAStack(num_layers=4, hidden=64, heads=4, head_dim=16, topk=8).eval()
    past_k, past_v = model.empty_cache(40, "cpu", torch.float32)
    x = torch.randn(8, 64)
    chosen = fic.indexcache_backend if backend == "inductor" else fic.indexcache_eager_backend
    compiled = torch.compile(model, backend=chosen, dynamic=False)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):  # each case compiles what it counts
        out, idx = compiled(x, past_k, past_v)
        with profile() as prof:
            compiled(x, past_k, past_v)
        want, want_idx = model(x, past_k, past_v, pattern="FFSS")
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("fx_indexcache::indexer_logits") == 2, calls  # both F layers, in the graph that ran
    assert counters["fx_indexcache"]["variant_indexers_fused"] == (0 if layer_count_known else 2)
    assert counters["fx_indexcache"]["indexers_fused"] == 2
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a.sort(-1).values, b.sort(-1).values) for a, b in zip(idx, want_idx))


@pytest.mark.parametrize("swap", [(0, 1), (1, 2), (0, 3)], ids=str)
def test_weights_exchanged_across_the_break_still_share(swap):
    """Numbered graphs find their span's layers by parameter storage too, and weights exchanged by ``.data`` keep
    their addresses under other layers. The lookup finds the stale entries (the parameter no longer holds the
    address), re-indexes the model, and the leading S layers read their F layer's indices, exactly."""
    model, segments = SegmentDecoder(N, seed=5), _segments((2,))
    compiled, backend = _compile(model, "FSSS")
    leading = _leading("FSSS", segments)
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        compiled(x, None, segments)
        a, b = (model.layers[i] for i in swap)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            pa.data, pb.data = pb.data, pa.data
        out = compiled(x, None, segments)
    torch.testing.assert_close(out, model.oracle_segments(x, _uses("FSSS"), None, segments), rtol=0, atol=0)
    assert _reads(model, backend) == {i: 0 for i in leading}
    assert backend.session.layer_map(model).stale_reindexed >= 1
