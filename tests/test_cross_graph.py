"""Issue 14: IndexCache across graph breaks, where one compiled layer graph runs as every layer.

Each test compares the compiled model with the hand-written oracle (``LoopDecoder.oracle``) exactly
(eager ATen backend), checks from ``layer_calls`` that the S layers really read their F layer's indices
(not vacuous), and that whenever the host check fails the layer computes: never stale indices.
"""

from __future__ import annotations

import pytest
import torch

import fx_indexcache as fic
from cross_graph_programs import D, LoopDecoder, MoEDecoder
from fx_indexcache.crossgraph import runtime as cross_graph
from fx_indexcache.crossgraph.runtime import CallAction, Fallback
from fx_indexcache.crossgraph.plan import CrossGraphOff

N = 4


def _config(pattern: str) -> fic.IndexCacheConfig:
    return fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern)


def _uses(pattern: str) -> list[int]:
    config = _config(pattern)
    return [config.source_layer(i) if config.layer_kind(i) == "S" else i for i in range(len(pattern))]


def _compile(model, pattern: str, backend=fic.indexcache_eager_backend):
    return torch.compile(model, backend=backend, options={"index_topk_pattern": pattern})


def _randn(*shape, seed: int):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _actions(model, owner=None) -> dict[int, CallAction]:
    return {call.layer: call.action for call in fic.layer_calls(model, owner)}


def _expected_actions(pattern: str) -> dict[int, CallAction]:
    return {i: CallAction.READ if c == "S" else CallAction.PUBLISHED for i, c in enumerate(pattern)}


def _check_steps(model, compiled, pattern: str) -> None:
    """Prefill at two lengths (the second compiles a dynamic graph), then two decode steps, batch 2."""
    uses = _uses(pattern)
    past = [_randn(2, 6, D, seed=10 + i) for i in range(N)]
    steps = [(_randn(2, 5, D, seed=1), None), (_randn(2, 7, D, seed=2), None),
             (_randn(2, 1, D, seed=3), past), (_randn(2, 1, D, seed=4), past)]
    with torch.no_grad():
        for x, cache in steps:
            out = compiled(x, cache)
            expected = model.oracle(x, uses, cache)
            assert not torch.equal(expected, model.oracle(x, list(range(N)), cache))  # sharing shows
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            assert _actions(model) == _expected_actions(pattern)


@pytest.mark.parametrize("pattern", ["FSFS", "FSSF", "FFSS"])
def test_loop_with_a_graph_break_equals_the_oracle(pattern):
    model = LoopDecoder(N)
    _check_steps(model, _compile(model, pattern), pattern)
    plans = [r.cross_graph for r in fic.reports() if r.cross_graph is not None]
    assert plans and all(plan.active and plan.s_nodes_removed > 0 for plan in plans)
    assert any("cross-graph: graph" in r.format() for r in fic.reports())


@pytest.mark.parametrize("pattern", ["FSSS", "FSFS"])
def test_official_style_moe_dispatch_equals_the_oracle(pattern):
    """``bincount().tolist()`` dispatch breaks every layer; one compiled attention graph serves all four."""
    model = MoEDecoder(N)
    _check_steps(model, _compile(model, pattern), pattern)
    calls = fic.layer_calls(model)
    assert len({call.graph for call in calls}) == 1  # one graph ran as every layer
    read = [call for call in calls if call.action is CallAction.READ]
    assert read and all(call.source_graph == call.graph and call.source_layer == _uses(pattern)[call.layer]
                        for call in read)


def _untouched(model, x, past=None, order=None):
    with torch.no_grad():
        return model.oracle(x, list(range(N)), past, order)


def test_skipping_the_f_layer_computes():
    model = LoopDecoder(N)
    compiled, x = _compile(model, "FSSS"), _randn(2, 5, D, seed=1)
    with torch.no_grad():
        compiled(x)
        out = compiled(x, None, [1, 2, 3])  # layer 0 never runs in this call
    torch.testing.assert_close(out, _untouched(model, x, None, [1, 2, 3]), rtol=0, atol=0)
    calls = {call.layer: call for call in fic.layer_calls(model)}
    assert {call.fallback for call in calls.values()} == {Fallback.NOT_PUBLISHED}


def test_a_gap_after_the_f_layer_computes():
    model = LoopDecoder(N)
    compiled, x = _compile(model, "FSSS"), _randn(2, 5, D, seed=1)
    with torch.no_grad():
        out = compiled(x, None, [0, 2, 3])
    torch.testing.assert_close(out, _untouched(model, x, None, [0, 2, 3]), rtol=0, atol=0)
    assert fic.layer_calls(model)[1].fallback is Fallback.NOT_CONSECUTIVE


def test_another_cache_length_in_an_s_layer_computes():
    """Same query shape, other key width: the published indices point into other keys."""
    model = LoopDecoder(N)
    compiled, x = _compile(model, "FSFS"), _randn(2, 1, D, seed=1)
    past = [_randn(2, 6 if i % 2 == 0 else 9, D, seed=10 + i) for i in range(N)]
    with torch.no_grad():
        out = compiled(x, past)
    torch.testing.assert_close(out, _untouched(model, x, past), rtol=0, atol=0)
    assert [call.fallback for call in fic.layer_calls(model)] == [None, Fallback.MISMATCH, None,
                                                                          Fallback.MISMATCH]


def test_a_call_that_starts_above_layer_zero_never_reads_the_previous_call():
    """Layers 0-1, then (a new model call) 2-3: layer 2 follows 1, but layer 0 published in the last call."""
    model = LoopDecoder(N)
    compiled = _compile(model, "FSSS")
    x, y = _randn(2, 5, D, seed=1), _randn(2, 5, D, seed=2)
    with torch.no_grad():
        compiled(x, None, [0, 1])
        out = compiled(y, None, [2, 3])
    torch.testing.assert_close(out, _untouched(model, y, None, [2, 3]), rtol=0, atol=0)
    assert {call.fallback for call in fic.layer_calls(model)} == {Fallback.NOT_PUBLISHED}


def test_without_the_host_check_stale_indices_show(monkeypatch):
    """Not vacuous: with the check switched off the same calls read the previous call's indices."""
    model = LoopDecoder(N)
    compiled = _compile(model, "FSSS")
    x, y = _randn(2, 5, D, seed=1), _randn(2, 5, D, seed=2)
    monkeypatch.setattr(cross_graph.Timeline, "readable",
                        lambda self, source, layer: self.published.get(source, Fallback.NOT_PUBLISHED))
    monkeypatch.setattr(cross_graph.Timeline, "new_forward", lambda self: None)
    with torch.no_grad():
        compiled(x)
        out = compiled(y, None, [1, 2, 3])
    assert not torch.equal(out, _untouched(model, y, None, [1, 2, 3]))


def test_disabled_runs_every_layer_as_it_is(monkeypatch):
    monkeypatch.setattr(cross_graph, "ENABLED", False)
    model = LoopDecoder(N)
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        out = _compile(model, "FSFS")(x)
    torch.testing.assert_close(out, _untouched(model, x), rtol=0, atol=0)
    assert fic.layer_calls(model) == []


def test_an_all_f_pattern_builds_no_variants():
    model = LoopDecoder(N)
    with torch.no_grad():
        _compile(model, "FFFF")(_randn(2, 5, D, seed=1))
    plans = [r.cross_graph for r in fic.reports() if r.cross_graph is not None]
    assert plans and all(not p.active and p.off is CrossGraphOff.NO_S_LAYER for p in plans)


def test_training_graphs_are_left_as_they_are():
    model = LoopDecoder(N)
    x = _randn(2, 5, D, seed=1)
    out = _compile(model, "FSFS")(x)
    torch.testing.assert_close(out, _untouched(model, x), rtol=0, atol=0)
    assert fic.layer_calls(model) == []


def test_inductor_shares_across_graphs():
    model = LoopDecoder(N)
    backend = fic.IndexCacheBackend(index_topk_pattern="FSFS")
    compiled = _compile(model, "FSFS", backend=backend)
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out, model.oracle(x, _uses("FSFS")), rtol=1e-5, atol=1e-5)
    assert _actions(model, backend) == _expected_actions("FSFS")


def test_cuda_graph_mode_shares_through_static_buffers():
    """mode="reduce-overhead" no longer switches sharing off: published indices live in static buffers. (On the CPU
    Inductor captures no CUDA graph; tests/gpu/test_cross_graph_cudagraphs_gpu.py checks the capture.)"""
    model = LoopDecoder(N)
    backend = fic.IndexCacheBackend(index_topk_pattern="FSFS")
    compiled = torch.compile(model, backend=backend, mode="reduce-overhead")
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out, model.oracle(x, _uses("FSFS")), rtol=1e-5, atol=1e-5)
    assert _actions(model, backend) == _expected_actions("FSFS")
    plans = [r.cross_graph for r in backend.reports if r.cross_graph is not None]
    assert plans and all(p.active for p in plans)


def test_published_indices_stay_at_one_address_across_calls():
    """The F layer writes a static buffer in place: the same tensor on every call of the same shape."""
    model = LoopDecoder(N)
    compiled, x = _compile(model, "FSSS"), _randn(2, 5, D, seed=1)
    with torch.no_grad():
        compiled(x)
        (timeline,) = fic.default_session().layer_map(model).timelines.values()
        first = timeline.published[0].indices
        compiled(_randn(2, 5, D, seed=2))
        assert timeline.published[0].indices is first
        torch.testing.assert_close(compiled(x), model.oracle(x, _uses("FSSS")), rtol=0, atol=0)


def test_per_layer_table_says_where_each_layer_got_its_indices():
    from dsa_programs import ModuleDSA, inputs

    model = LoopDecoder(N)
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    with torch.no_grad():
        torch.compile(model, backend=backend)(_randn(2, 5, D, seed=1))
    rows = fic.layer_sharing(model, backend)
    assert [(r.layer, r.sharing, r.source_layer, r.publishes) for r in rows] == [
        (0, fic.report.sharing.Sharing.COMPUTED, 0, True), (1, fic.report.sharing.Sharing.ACROSS_GRAPHS, 0, False),
        (2, fic.report.sharing.Sharing.COMPUTED, 2, True), (3, fic.report.sharing.Sharing.ACROSS_GRAPHS, 2, False)]
    assert rows[1].source_graph == rows[0].graph
    assert "shared across graph calls" in fic.format_layer_sharing(rows)

    whole = ModuleDSA(4)  # one graph, numbered by module paths: shared inside it
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    with torch.no_grad():
        torch.compile(whole, backend=backend)(inputs())
    rows = fic.layer_sharing(whole, backend)
    assert [r.sharing for r in rows] == [fic.report.sharing.Sharing.COMPUTED, fic.report.sharing.Sharing.INSIDE_GRAPH] * 2


def test_another_instance_and_replaced_parameters_are_found_again():
    first, second = LoopDecoder(N, seed=0), LoopDecoder(N, seed=1)
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        _compile(first, "FSFS")(x)
        out = _compile(second, "FSFS")(x)  # dynamo reuses first's layer graphs for second's layers
        torch.testing.assert_close(out, second.oracle(x, _uses("FSFS")), rtol=0, atol=0)
        assert _actions(second) == _expected_actions("FSFS")
        for param in second.parameters():
            param.data = param.data.clone() * 1.5  # new storage: the old map no longer matches
        out = _compile(second, "FSFS")(x)
    torch.testing.assert_close(out, second.oracle(x, _uses("FSFS")), rtol=0, atol=0)
    assert _actions(second) == _expected_actions("FSFS")


def _swap_storages(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Exchange two blocks' weights by ``.data`` (no allocation: each storage keeps its address under the other)."""
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        pa.data, pb.data = pb.data, pa.data


@pytest.mark.parametrize("order", [(1, 0, 2, 3), (3, 1, 2, 0), (2, 3, 0, 1), (1, 2, 3, 0)], ids=str)
def test_weights_moved_between_layers_are_found_under_their_new_layer(order):
    """The layer map found layers by storage address: weights exchanged by ``.data`` keep their addresses, so
    position 0 was taken for the layer whose weights it now holds (an S layer with nothing published: FSFS ran
    as F, F, F, S). Every lookup now checks the parameter still holds the address it was indexed under and
    re-indexes the model where one does not: the layers are their positions again, and sharing follows the
    pattern."""
    model = LoopDecoder(N, seed=3)
    x = _randn(2, 5, D, seed=1)
    compiled = _compile(model, "FSFS")
    with torch.no_grad():
        compiled(x)
        moved = [[p.data for p in model.layers[i].parameters()] for i in order]
        for layer, data in zip(model.layers, moved):
            for param, new in zip(layer.parameters(), data):
                param.data = new
        out = compiled(x)
    torch.testing.assert_close(out, model.oracle(x, _uses("FSFS")), rtol=0, atol=0)
    assert _actions(model) == _expected_actions("FSFS")
    assert fic.default_session().layer_map(model).stale_reindexed >= 1


def test_weights_moved_from_another_model_are_never_its_layers():
    """Dynamo runs ``first``'s layer graphs as ``second``'s layers, so the callables know both models' maps, first's
    first. A storage moved from ``first``'s layer 0 into ``second``'s layer 2 was found in first's map as first's
    layer 0: second's call ran on first's timeline. It is second's layer 2, and first's timeline sees nothing."""
    first, second = LoopDecoder(N, seed=0), LoopDecoder(N, seed=1)
    x = _randn(2, 5, D, seed=1)
    with torch.no_grad():
        _compile(first, "FSFS")(x)
        compiled = _compile(second, "FSFS")
        compiled(x)
        first_calls = fic.layer_calls(first)
        _swap_storages(first.layers[0], second.layers[2])
        out = compiled(x)
    torch.testing.assert_close(out, second.oracle(x, _uses("FSFS")), rtol=0, atol=0)
    assert _actions(second) == _expected_actions("FSFS")
    assert fic.layer_calls(first) == first_calls


def test_indices_published_by_one_graph_are_read_by_another():
    from cross_graph_programs import DenseFirstDecoder

    model = DenseFirstDecoder(N)
    _check_steps(model, _compile(model, "FSSS"), "FSSS")
    calls = fic.layer_calls(model)
    assert calls[0].graph != calls[1].graph and {c.source_graph for c in calls[1:]} == {calls[0].graph}


def test_threads_never_read_each_others_indices():
    """Thread B runs layer 0 while thread A waits between its layers 0 and 1: A's layer 1 reads A's indices."""
    import threading

    model = LoopDecoder(N)
    compiled = _compile(model, "FSSS")
    x, y = _randn(2, 5, D, seed=1), _randn(2, 5, D, seed=2)
    with torch.no_grad():
        compiled(x)  # compile first
    b_done, out = threading.Event(), {}

    @torch._dynamo.disable
    def pause_a(module, args):
        if threading.current_thread().name == "A":
            worker_b.start()
            b_done.wait(30)

    def run(name, inputs, order):
        with torch.no_grad():
            out[name] = compiled(inputs, None, order)
        if name == "B":
            b_done.set()

    model.layers[1].register_forward_pre_hook(pause_a)
    worker_a = threading.Thread(target=run, args=("A", x, [0, 1]), name="A")
    worker_b = threading.Thread(target=run, args=("B", y, [0]), name="B")
    worker_a.start()
    worker_a.join(60)
    worker_b.join(60)
    assert b_done.is_set()
    with torch.no_grad():
        torch.testing.assert_close(out["A"], model.oracle(x, [0, 0, 2, 3], None, [0, 1]), rtol=0, atol=0)


class AliasedLoopDecoder(LoopDecoder):
    """The loop runs a second list that holds the same blocks (as hybrid models keep their DSA blocks), a graph
    break after each: a call's parameters name the block twice (``layers.i``, ``sparse.i``)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(n, seed)
        self.sparse = torch.nn.ModuleList(self.layers[i] for i in range(n))

    def forward(self, x, past=None, order=None):
        for i in range(len(self.sparse)) if order is None else order:
            x, _ = self.sparse[i](x, None if past is None else past[i])
            torch._dynamo.graph_break()
        return x


@pytest.mark.parametrize("pattern", ["FSFS", "FSSF"])
def test_a_block_two_lists_hold_is_numbered_by_the_list_that_owns_it(pattern):
    """Before, a parameter reached under two names mapped to no layer (as a tied weight does): safe, but nothing
    shared. Each module now counts once, under its first name."""
    model = AliasedLoopDecoder(N)
    _check_steps(model, _compile(model, pattern), pattern)
    assert {call.container for call in fic.layer_calls(model)} == {"layers"}


def test_a_weight_two_layers_tie_makes_neither_a_layer_call():
    """One parameter held by layers 1 and 2 (tied): the run time cannot tell which layer those calls are, so they
    run as compiled, their own indexers included, and layer 3 does not read across them (the module-once index
    must not merge two modules' names for one parameter)."""
    model = LoopDecoder(N)
    model.layers[2].indexer.wq = model.layers[1].indexer.wq
    compiled, x = _compile(model, "FSSS"), _randn(2, 5, D, seed=1)
    with torch.no_grad():
        compiled(x)
        out = compiled(x)
    calls = {call.layer: call for call in fic.layer_calls(model)}
    assert sorted(calls) == [0, 3], calls
    assert calls[3].action is CallAction.COMPUTED and calls[3].fallback is Fallback.NOT_CONSECUTIVE, calls[3]
    torch.testing.assert_close(out, _untouched(model, x), rtol=0, atol=0)
