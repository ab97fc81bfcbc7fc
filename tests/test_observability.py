"""What a user sees of the pass in logs: per-module loggers, stage timings and graph dumps at DEBUG,
and a per-graph INFO table that stays readable when the same graph is compiled once per range."""

from __future__ import annotations

import logging
import re

import torch
from conftest import CapturingBackend, model_pair

from fx_indexcache import IndexCacheConfig, IndexCachePass
from fx_indexcache.graph_utils import copy_graph_module
from fx_indexcache.models.reference import DSAModelConfig

TINY = DSAModelConfig.tiny(num_layers=4, first_k_dense_layers=4)
TOPK = torch.ops.aten.topk.default


def _compile_fsfs():
    model, _ = model_pair(TINY)
    backend = CapturingBackend(index_topk_pattern="FSFS")
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randint(0, TINY.vocab_size, (1, 24)))
    return backend


def test_debug_shows_stage_timings_and_the_graph_before_and_after(caplog):
    with caplog.at_level(logging.DEBUG, logger="fx_indexcache"):
        backend = _compile_fsfs()
    ours = [r for r in caplog.records if r.name.startswith("fx_indexcache")]
    assert ours and all(r.name.startswith("fx_indexcache.") for r in ours)  # module loggers, children of the package's
    dumps = {when: [r.getMessage() for r in ours if f" {when} IndexCache (" in r.getMessage()] for when in ("before", "after")}
    (before,), (after,) = dumps["before"], dumps["after"]
    topk_calls = [len(re.findall(r"torch\.ops\.aten\.topk\.default\(", text)) for text in (before, after)]
    assert topk_calls == [*backend.count_before(TOPK), *backend.count_after(TOPK)]
    assert topk_calls[0] - topk_calls[1] == 2  # the two S layers' indexers are gone
    (timing,) = [r.getMessage() for r in ours if "IndexCache pass" in r.getMessage()]
    assert all(f"{stage} " in timing and " ms" in timing for stage in ("detect", "share", "fuse"))


def test_nothing_is_dumped_at_info(caplog):
    with caplog.at_level(logging.INFO, logger="fx_indexcache"):
        _compile_fsfs()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("fx_indexcache")]
    assert any(m.startswith("IndexCache report") for m in messages)  # the per-graph table
    assert not any(" before IndexCache (" in m or "IndexCache pass" in m for m in messages)


def test_a_table_repeated_for_another_compile_range_is_one_line(caplog):
    (gm,) = _compile_fsfs().before
    graph_pass = IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_pattern="FSFS"),
                                graph_starts_at_first_layer=True)
    with caplog.at_level(logging.INFO, logger="fx_indexcache"):
        for name in ("vLLM graph for token range (1, 8192)", "vLLM graph for token range (8, 8)"):
            report = graph_pass.run(copy_graph_module(gm).graph, graph_name=name)
            assert report.indexers_removed == 2
    first, second = [r.getMessage() for r in caplog.records if r.getMessage().startswith("IndexCache report")]
    assert "layer  F/S" in first and "(1, 8192)" in first
    assert second == ("IndexCache report for vLLM graph for token range (8, 8): the same as for "
                      "vLLM graph for token range (1, 8192) (2 of 4 indexers removed)")
