"""Tensor parallel on the CPU (issue 30, item 1): IndexCache holds when the value path is split across ranks.

Two ranks over gloo run a 4-layer DSA model whose value projections are split (column-split in, row-split out,
an all-reduce after) while the indexer is replicated, in the two ways people write it: by hand with functional
``all_reduce`` (Megatron style), and with DTensor's ``parallelize_module`` (``ColwiseParallel`` /
``RowwiseParallel``). Compiled with the eager IndexCache backend at FSFS and FSSS, each rank's output equals the
other's bit for bit and the single-process model running the hand-written IndexCache (up to the all-reduce's
summation order), and each report shows the S layers shared. One 2-process job runs every case.
"""

from __future__ import annotations

import pytest
import torch

import fx_indexcache as fic
from gloo_job import parallel_results, skip_without_gloo
from parallel_programs import LinearDSA, TensorParallelDSA, tensor_parallel_plan

pytestmark = skip_without_gloo()

LAYERS = 4
PATTERNS = ("FSFS", "FSSS")
STYLES = ("functional all_reduce", "DTensor parallelize_module")


def _x() -> torch.Tensor:
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(1))


def _model(style: str, rank: int, world: int):
    if style == STYLES[0]:
        return TensorParallelDSA(LAYERS, rank, world)
    model = LinearDSA(LAYERS)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(model, init_device_mesh("cpu", (world,)), tensor_parallel_plan(LAYERS))
    return model


def tensor_parallel_job() -> dict:
    """Every style and pattern on this rank: the output and the report's per-layer actions."""
    import torch.distributed as dist

    rank, world, results = dist.get_rank(), dist.get_world_size(), {}
    for style in STYLES:
        for pattern in PATTERNS:
            torch._dynamo.reset()
            backend = fic.IndexCacheEagerBackend(index_topk_pattern=pattern)
            with torch.no_grad():
                out = torch.compile(_model(style, rank, world), backend=backend)(_x())
            (report,) = backend.reports
            results[style, pattern] = (out, [(d.layer, str(d.action), d.source_layer) for d in report.decisions])
    return results


@pytest.fixture(scope="module")
def ranks():
    return parallel_results("tensor parallel")


def _oracle(style: str, pattern: str) -> torch.Tensor:
    config = fic.IndexCacheConfig(index_topk_pattern=pattern)
    uses = [config.buffer_sources(range(LAYERS))[i] for i in range(LAYERS)]
    with torch.no_grad():
        return _model(style, 0, 1)(_x(), uses)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_each_rank_equals_the_single_process_index_cache(ranks, style, pattern):
    (first, actions), (second, other_actions) = ranks[0][style, pattern], ranks[1][style, pattern]
    assert torch.equal(first, second)
    torch.testing.assert_close(first, _oracle(style, pattern), rtol=1e-5, atol=1e-5)
    config = fic.IndexCacheConfig(index_topk_pattern=pattern)
    want = [(i, "computed" if source == i else "shared", source)
            for i, source in sorted(config.buffer_sources(range(LAYERS)).items())]
    assert actions == other_actions == want


@pytest.mark.parametrize("style", STYLES)
def test_index_cache_changes_the_tensor_parallel_result(ranks, style):
    """The oracle is not the plain model: the comparison above would catch a rank that ignored the pattern."""
    with torch.no_grad():
        plain = _model(style, 0, 1)(_x())
    assert not torch.allclose(ranks[0][style, "FSSS"][0], plain, atol=1e-3)
