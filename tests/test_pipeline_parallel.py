"""Pipeline parallel on the CPU (issue 30, item 3): a stage runs IndexCache as the engines run it, or receives the
top-k across the cut.

A stage told ``stage_first_layer`` is a stage of its own process: no layer before it wrote the engines' top-k
buffer there, so its first indexed layer computes and its later S layers read the nearest layer that computed (at
FSSS, stage 2 computes layer 2 and layer 3 reads it: vLLM's and SGLang's per-stage rule). Untold, the stage's S
layers whose F layer is elsewhere compute, as before. Opting in to ship the top-k instead (export, rewrite, then
``pipeline()``): the tracer carries layer 0's indices across the cut with the hidden state, and the stage's S
layers read them, which is the single-process IndexCache.

The stage styles are those the engines and torch use: a ``ModuleDict`` keyed by global numbers (torchtitan), the
stage module ``pipeline()`` cuts (global names in a plain container), a list of its own numbered from 0. The
2-process part runs ``PipelineStage`` + ``ScheduleGPipe`` over gloo, one job for the whole module.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_indexcache as fic
from dsa_programs import ModuleDSA, inputs
from gloo_job import parallel_results, skip_without_gloo

PATTERNS = {"FSSS": ([0, 0, 2, 2], [2]), "FSFS": ([0, 0, 2, 2], [])}  # the engines' uses, layers computed for the cut
GLOO_PATTERNS = ("FSSS",)  # the pattern whose cut costs a layer; FSFS's stage decisions are checked in one process


class Split(ModuleDSA):
    """``ModuleDSA`` whose forward marks the cut before layer 2 for ``pipeline()``."""

    def forward(self, x, uses=None):
        from torch.distributed.pipelining import pipe_split

        cache = {}
        for i in range(self.n):
            if i == 2:
                pipe_split()
            cache[i] = self.layers[i].indexer(x)
            x = self.layers[i](x, cache[uses[i]] if uses is not None else cache[i])
        return x


class DictStage(nn.Module):
    """Layers ``first..`` keyed by their global numbers (torchtitan's stage: the other layers deleted)."""

    def __init__(self, full: ModuleDSA, first: int) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): full.layers[i] for i in range(first, full.n)})

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x, layer.indexer(x))
        return x


class ListStage(DictStage):
    """Layers ``first..`` in a list of their own: paths from ``layers.0``."""

    def __init__(self, full: ModuleDSA, first: int) -> None:
        nn.Module.__init__(self)
        self.layers = nn.ModuleList(list(full.layers)[first:])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, layer.indexer(x))
        return x


def _cut_stage(full: ModuleDSA, first: int) -> nn.Module:
    """The stage module torch.distributed.pipelining's tracer makes (its ``layers`` holds ``2`` and ``3``)."""
    from torch.distributed.pipelining import pipeline

    split = Split(4)
    split.load_state_dict(full.state_dict())
    with torch.no_grad():
        return pipeline(split, mb_args=(inputs(),)).get_stage_module(1)


STAGES = {"ModuleDict": DictStage, "list of its own": ListStage, "pipeline() stage": _cut_stage}


def _engines(model: ModuleDSA, uses: list[int], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, uses)


def _compile_stage(stage: nn.Module, pattern: str, **options):
    backend = fic.IndexCacheEagerBackend(index_topk_pattern=pattern, **options)
    with torch.no_grad():
        hidden = ModuleDSA(4).run(inputs(), 0, 2, [0, 1], {})  # some hidden state an earlier stage hands on
        return torch.compile(stage, backend=backend)(hidden), backend.reports[-1], hidden


@pytest.mark.parametrize("style", sorted(STAGES))
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_a_stage_told_where_it_starts_runs_the_engines_rule(style, pattern):
    full = ModuleDSA(4)
    uses, cut = PATTERNS[pattern]
    out, report, hidden = _compile_stage(STAGES[style](full, 2), pattern, stage_first_layer=2)
    assert [d.layer for d in report.decisions] == [2, 3]
    assert report.computed_for_cut == cut
    assert [d.source_layer for d in report.decisions] == [2, 2]
    assert report.indexers_removed == 1
    assert f"pipeline stage from layer 2: {'layer(s) 2 compute' if cut else 'no layer computes'}" in report.format()
    with torch.no_grad():
        want = full.run(hidden, 2, 4, uses, {})
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_an_untold_stage_with_global_names_keeps_computing():
    """Without stage_first_layer nothing says the earlier layers run elsewhere: both S layers compute, as before."""
    out, report, hidden = _compile_stage(DictStage(ModuleDSA(4), 2), "FSSS")
    assert report.indexers_removed == 0 and report.computed_for_cut == []
    assert all("has no indexer site in this graph" in d.note for d in report.decisions)
    with torch.no_grad():
        torch.testing.assert_close(out, DictStage(ModuleDSA(4), 2)(hidden), rtol=0, atol=0)


def test_global_names_are_not_shifted_but_a_list_of_its_own_is():
    from fx_indexcache.detection.stage import stage_paths_are_global

    full = ModuleDSA(4)
    assert stage_paths_are_global(DictStage(full, 2), "layers", 2, 4)
    assert stage_paths_are_global(_cut_stage(full, 2), "layers", 2, 4)
    assert not stage_paths_are_global(ListStage(full, 2), "layers", 2, 4)
    whole = ModuleDSA(4)
    assert stage_paths_are_global(whole, "layers", 2, 4)  # the whole list: positions are global
    whole.layers[0], whole.layers[1] = nn.Identity(), nn.Identity()  # weightless placeholders (vLLM's PP)
    assert stage_paths_are_global(whole, "layers", 2, None)


# ---------------------------------------------------------------------------------------------- two processes


def pipeline_job() -> dict:
    """Rank r runs stage r of a 2-stage GPipe schedule, per case; rank 1 returns the outputs and reports."""
    import torch.distributed as dist
    from torch.distributed.pipelining import ScheduleGPipe, pipeline

    rank, results = dist.get_rank(), {}
    for pattern in GLOO_PATTERNS:
        full = Split(4)
        with torch.no_grad():
            pipe = pipeline(full, mb_args=(inputs(),))
        stage_module = pipe.get_stage_module(rank)
        backend = fic.IndexCacheEagerBackend(index_topk_pattern=pattern, stage_first_layer=2 * rank)
        stage_module.forward = torch.compile(stage_module.forward, backend=backend)
        results[f"engines {pattern}"] = _step(ScheduleGPipe(pipe.build_stage(rank, torch.device("cpu")), 1), rank)
        results[f"engines {pattern} report"] = backend.reports[-1].format()
        results[f"engines {pattern} cut"] = backend.reports[-1].computed_for_cut
        # Opt-in: the top-k crosses the cut. Rewrite the whole program, then cut it: the tracer ships what the
        # stage reads, layer 0's indices with the hidden state.
        with torch.no_grad():
            program = torch.export.export(Split(4), (inputs(),))
            fic.apply_index_cache_to_exported_program(program, index_topk_pattern=pattern)
            shipped = pipeline(program.module(), mb_args=(inputs(),))
        boundary = [node for node in shipped.get_stage_module(1).graph.nodes if node.op == "placeholder"]
        results[f"shipped {pattern}"] = _step(ScheduleGPipe(shipped.build_stage(rank, torch.device("cpu")), 1), rank)
        results[f"shipped {pattern} inputs"] = len(boundary)
    return results


def _step(schedule, rank: int):
    with torch.no_grad():
        return schedule.step(inputs()) if rank == 0 else schedule.step()


@pytest.fixture(scope="module")
def pipeline_run():
    return parallel_results("pipeline")


@skip_without_gloo()
@pytest.mark.parametrize("pattern", GLOO_PATTERNS)
def test_two_stage_gpipe_runs_the_engines_rule_per_stage(pipeline_run, pattern):
    """Stage 2 of FSSS computes layer 2 because of the cut and layer 3 reads it: the engines' result."""
    _, last = pipeline_run
    uses, cut = PATTERNS[pattern]
    torch.testing.assert_close(last[f"engines {pattern}"], _engines(ModuleDSA(4), uses, inputs()), rtol=0, atol=0)
    assert last[f"engines {pattern} cut"] == cut


@skip_without_gloo()
@pytest.mark.parametrize("pattern", GLOO_PATTERNS)
def test_shipping_the_top_k_across_the_cut_is_the_single_process_index_cache(pipeline_run, pattern):
    _, last = pipeline_run
    config = fic.IndexCacheConfig(index_topk_pattern=pattern)
    uses = [config.buffer_sources(range(4))[i] for i in range(4)]
    torch.testing.assert_close(last[f"shipped {pattern}"], _engines(ModuleDSA(4), uses, inputs()), rtol=0, atol=0)
    assert last[f"shipped {pattern} inputs"] == (2 if uses[2] < 2 else 1)  # the hidden state, and layer 0's top-k
