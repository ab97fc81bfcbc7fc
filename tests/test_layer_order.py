"""Layers that run out of their numbered order (CPU).

The pattern numbers layers as their module paths do, and an S layer reads "the nearest preceding F layer". The
engines read that from one buffer: whatever F layer computed last as the model ran. A model whose forward runs
its numbered blocks in another order (``self.layers[i] for i in order``) makes the two readings differ, and the
pass must never pick one silently: an S layer shares only where its source by number is also the last layer that
computed before it as the model ran; otherwise it keeps its own indices and the report says why.

The property: for any order and pattern, every shared layer's source is the one the engines' buffer would hold,
and the compiled model equals the hand-written model that uses exactly the sources the report states.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from capture import GraphCapture
from dsa_programs import Block, inputs
from hypothesis import HealthCheck, given, settings
from torch import nn

from fx_indexcache import IndexCacheConfig, IndexCachePass
from fx_indexcache.rewrite.share import SHARED


class OrderedDSA(nn.Module):
    """``layers.N`` blocks run in ``order``; ``uses[i]`` (hand-written IndexCache) is the layer whose indices
    layer ``i`` reads, its own when it computes."""

    def __init__(self, n: int, order: list[int], seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(Block(gen) for _ in range(n))
        self.order = order

    def forward(self, x, uses=None):
        computed = {}
        for i in self.order:
            source = i if uses is None else uses[i]
            if source == i:
                computed[i] = self.layers[i].indexer(x)
            x = self.layers[i](x, computed[source])
        return x


def _compile_and_report(model: OrderedDSA, pattern: str):
    graph_pass = IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern),
                                graph_starts_at_first_layer=True)
    backend = GraphCapture(graph_pass.run)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(inputs())
    (report,) = backend.results
    return out, report


def _engine_source(order: list[int], pattern: str, layer: int) -> int | None:
    """The layer whose indices the engines' one buffer holds when ``layer`` runs: the last F layer before it as
    the model runs (None: none has run)."""
    before = order[: order.index(layer)]
    return next((i for i in reversed(before) if pattern[i] == "F"), None)


def _check(order: list[int], pattern: str) -> list:
    torch._dynamo.reset()
    model = OrderedDSA(len(order), order).eval()
    out, report = _compile_and_report(model, pattern)
    uses = list(range(len(order)))
    for decision in report.decisions:
        if decision.action == SHARED:
            assert decision.source_layer == _engine_source(order, pattern, decision.layer), (order, pattern, decision)
            uses[decision.layer] = decision.source_layer
    with torch.no_grad():
        assert torch.equal(out, model(inputs(), uses)), (order, pattern, uses)
    return report.decisions


def test_in_numbered_order_the_s_layers_share():
    decisions = _check([0, 1, 2, 3], "FSFS")
    assert [d.source_layer for d in decisions] == [0, 0, 2, 2]


@pytest.mark.parametrize("order", [[0, 2, 1, 3], [1, 0, 2, 3], [0, 1, 3, 2]])
def test_an_f_layer_run_between_source_and_s_layer_keeps_the_s_layer_computing(order):
    """By number layer 2's source is layer 1; as these models run, layer 0 or 3 computes last before it."""
    decisions = {d.layer: d for d in _check(order, "FFSF")}
    assert decisions[2].action != SHARED and decisions[2].source_layer == 2
    assert "out of their numbered order" in decisions[2].note or "computed after" in decisions[2].note


def test_a_layer_run_out_of_order_outside_the_span_does_not_stop_sharing():
    """Layer 3 runs first; layers 1 and 2 run right after layer 0, their source by number and as the model runs."""
    decisions = {d.layer: d for d in _check([3, 0, 1, 2], "FSSF")}
    assert [(decisions[i].action, decisions[i].source_layer) for i in (1, 2)] == [(SHARED, 0), (SHARED, 0)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.permutations(range(5)), st.lists(st.sampled_from("FS"), min_size=4, max_size=4))
def test_every_shared_layer_reads_what_the_engines_buffer_holds(order, tail):
    _check(list(order), "F" + "".join(tail))


def test_a_stack_run_twice_is_left_as_it_is(caplog):
    """A recurrent stack (the blocks run again, 0 1 2 0 1 2) traces each indexer twice under one module path. Each
    run selects for another input, so neither is the layer's one selection: sharing across runs by number would read
    the first round's indices in the second. Every site computes and the report says the indexer runs twice."""
    torch._dynamo.reset()
    model = OrderedDSA(3, [0, 1, 2, 0, 1, 2]).eval()
    with caplog.at_level("WARNING", logger="fx_indexcache"):
        out, report = _compile_and_report(model, "FSS")
    assert report.decisions == [] and report.indexers_removed == 0 and report.indexers_left_alone == 6
    assert "6 more indexer(s) left as they are" in report.format().splitlines()[0]
    left = [note for note in report.other_notes if note.startswith("left alone")]
    assert len(left) == 6 and all("runs 2 times" in note for note in left), left
    assert "all left as they are" in caplog.text and "holds no DSA lightning indexer" not in caplog.text
    with torch.no_grad():
        assert torch.equal(out, model(inputs()))
