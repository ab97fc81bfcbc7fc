"""Issue 11, items 1-2: no S decision on a guessed layer index, and a second application never renumbers.

A graph's own order is the model's layer index only for a graph that starts at the model's first
DSA layer. After a graph break (a resume function), in a block dynamo compiled on its own, or in
a graph the pass already rewrote, it is not; there the layer index is unknown (every layer
computes, the report says why, the logger warns) or read back from the record the rewrite left.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import fx_indexcache as fic
from dsa_programs import Block, FunctionalDSA, Indexer, ModuleDSA, inputs, uses_for
from fx_indexcache.detection.registry import LayerSource, UnknownLayerIndex


def _config(pattern: str) -> fic.IndexCacheConfig:
    return fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern)


def _compile(model, x, pattern: str):
    fic.clear_reports()
    compiled = torch.compile(model, backend=fic.indexcache_eager_backend, options={"index_topk_pattern": pattern})
    with torch.no_grad():
        return compiled(x), fic.reports()


def _run(model, x, uses=None):
    with torch.no_grad():
        return model(x, uses)


def test_functional_graph_break_numbers_neither_graph(caplog):
    """FSFF with a break after layer 1. Numbered 0, 1 the second graph made layer 3 S; the first graph holds 2
    indexers of a 4-layer model, so its order cannot prove which layers they are either (a hybrid stack would
    look the same): both compute, and each says why."""
    model, x = FunctionalDSA(4, break_at=2), inputs()
    with caplog.at_level(logging.WARNING, logger="fx_indexcache"):
        out, (first, second) = _compile(model, x, "FSFF")
    assert first.layer_index_unknown is UnknownLayerIndex.COUNT_MISMATCH
    assert "2 indexers, 4 decoder layers" in first.format()
    assert second.layer_source is LayerSource.UNKNOWN
    assert second.layer_index_unknown is UnknownLayerIndex.NOT_WHOLE_GRAPH
    assert [(d.layer, d.marked, d.action) for d in second.decisions] == [(None, "?", "computed")] * 2
    assert "layer index unknown" in second.format() and "resume function" in second.format()
    warnings = [r for r in caplog.records if "layer index" in r.getMessage()]
    assert len(warnings) == 2  # once for each graph whose index is unknown
    untouched = _run(model, x)
    assert not torch.equal(untouched, _run(model, x, uses_for(_config("FSFF"), 4)))  # sharing would show
    torch.testing.assert_close(out, untouched, rtol=0, atol=0)


def test_module_paths_number_the_resumed_graph():
    model, x = ModuleDSA(4, break_at=2), inputs()
    out, reports = _compile(model, x, "FSFS")
    assert [r.layer_source for r in reports] == [LayerSource.MODULE_PATH] * 2
    assert [[d.layer for d in r.decisions] for r in reports] == [[0, 1], [2, 3]]
    torch.testing.assert_close(out, _run(model, x, [0, 0, 2, 2]), rtol=0, atol=0)


def test_functional_model_compiled_whole_still_shares():
    model, x = FunctionalDSA(4), inputs()
    out, (report,) = _compile(model, x, "FSSF")
    assert report.layer_source is LayerSource.WHOLE_GRAPH_ORDER and report.pattern == "FSSF"
    assert report.layer_index_unknown is None and report.indexers_removed == 2
    torch.testing.assert_close(out, _run(model, x, [0, 0, 0, 3]), rtol=0, atol=0)


class TwoLayerBlock(nn.Module):
    """Two DSA layers in one module whose paths carry no layer number (``first.indexer``)."""

    def __init__(self, gen) -> None:
        super().__init__()
        self.first, self.second = Block(gen), Block(gen)

    def forward(self, x):
        x = self.first(x, self.first.indexer(x))
        return self.second(x, self.second.indexer(x))


class BlockStack(nn.Module):
    """A graph break inside the loop: dynamo compiles each block on its own, one graph for both blocks."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.blocks = nn.ModuleList(TwoLayerBlock(gen) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            torch._dynamo.graph_break()
        return x


def test_block_compiled_as_its_own_frame_has_an_unknown_index():
    model, x = BlockStack(), inputs()
    with torch.no_grad():
        untouched = model(x)
    out, reports = _compile(model, x, "FSFS")
    assert reports and all(r.layer_index_unknown is UnknownLayerIndex.NOT_WHOLE_GRAPH for r in reports)
    assert sum(r.indexers_removed for r in reports) == 0
    torch.testing.assert_close(out, untouched, rtol=0, atol=0)


def _functional_export(n: int = 4):
    model, x = FunctionalDSA(n), inputs()
    with torch.no_grad():
        program = torch.export.export(model, (x,), strict=False)
    for node in program.graph.nodes:  # a graph without module paths
        node.meta.pop("nn_module_stack", None)
    return model, x, program


def test_a_bare_pass_does_not_number_a_graph_it_knows_nothing_about():
    model, x, program = _functional_export()
    graph = copy.deepcopy(program.graph_module).graph
    report = fic.IndexCachePass(_config("FSFS")).run(graph)
    assert report.layer_index_unknown is UnknownLayerIndex.NO_PROOF and report.indexers_removed == 0
    told = fic.IndexCachePass(_config("FSFS"), graph_starts_at_first_layer=True).run(graph)
    assert told.layer_source is LayerSource.WHOLE_GRAPH_ORDER and told.indexers_removed == 2


def test_export_rewritten_twice_stays_fsfs():
    model, x, program = _functional_export()
    first = fic.apply_index_cache_to_exported_program(program, _config("FSFS"))
    second = fic.apply_index_cache_to_exported_program(program, _config("FSFS"))
    assert first.pattern == "FSFS" and first.layer_source is LayerSource.WHOLE_GRAPH_ORDER
    assert second.layer_source is LayerSource.RECORDED and second.indexers_removed == 0
    assert [d.layer for d in second.decisions] == [0, 2] and second.shared_earlier == (1, 3)
    expected = _run(model, x, [0, 0, 2, 2])
    assert not torch.equal(expected, _run(model, x, [0, 0, 0, 0]))  # FSSS would show
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)


def test_export_rewritten_then_compiled_with_the_backend_stays_fsfs():
    model, x, program = _functional_export()
    fic.apply_index_cache_to_exported_program(program, _config("FSFS"))
    out, (report,) = _compile(program.module(), x, "FSFS")
    assert report.layer_source is LayerSource.RECORDED and [d.layer for d in report.decisions] == [0, 2]
    torch.testing.assert_close(out, _run(model, x, [0, 0, 2, 2]), rtol=0, atol=0)


def test_a_rewritten_graph_that_lost_its_record_is_not_renumbered():
    model, x, program = _functional_export()
    fic.apply_index_cache_to_exported_program(program, _config("FSFS"))
    for node in program.graph.nodes:
        node.meta.pop("custom", None)
    out, (report,) = _compile(program.module(), x, "FSFS")
    assert report.layer_index_unknown is UnknownLayerIndex.NOT_WHOLE_GRAPH and report.indexers_removed == 0
    torch.testing.assert_close(out, _run(model, x, [0, 0, 2, 2]), rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["FSFS", "FFSS"])
def test_second_application_with_another_pattern_never_chains_a_removed_layer(pattern):
    """After FSFS, layer 1 reads layer 0's indices: FFSS's layer 2 may not take "layer 1's" (really 0's)."""
    model, x, program = _functional_export()
    fic.apply_index_cache_to_exported_program(program, _config("FSFS"))
    again = fic.apply_index_cache_to_exported_program(program, _config(pattern))
    assert again.indexers_removed == 0
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), _run(model, x, [0, 0, 2, 2]), rtol=0, atol=0)


def test_indexer_module_alone_numbers_nothing_it_cannot_prove():
    """An Indexer module compiled from a skipped frame: path without a layer number, nested frame."""
    indexer = Indexer(torch.Generator().manual_seed(0))

    def forward(x):
        torch._dynamo.graph_break()
        return indexer(x) + indexer(x + 1)

    fic.clear_reports()
    with torch.no_grad():
        torch.compile(forward, backend=fic.indexcache_eager_backend, options={"index_topk_pattern": "FS"})(inputs())
    decided = [r for r in fic.reports() if r.decisions]
    assert decided and all(r.indexers_removed == 0 for r in decided)
