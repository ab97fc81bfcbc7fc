"""Run one function in a 2-process gloo job on the CPU, for the parallelism tests, and bring its results back.

One spawn for the whole session (``parallel_results``: the tensor-parallel, sharded-indexer and pipeline cases in
one job, each test module reading its part): starting two Python processes that import torch costs seconds on
this 2-core machine, a case a fraction of that. The processes meet through a file store in a
temporary directory (no port to race for), each writes ``rank<r>.pt`` (what the function returned), and the job is
killed when it outlives ``timeout_s``, so a collective that hangs fails the test instead of the suite.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

WORLD = 2


def gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def skip_without_gloo():
    """A module-level ``pytestmark`` for tests that need torch.distributed with gloo."""
    return pytest.mark.skipif(not gloo_available(), reason="torch.distributed with the gloo backend is unavailable")


def _worker(rank: int, job: Callable[[], Any], store_dir: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=WORLD)
    try:
        result = job()
        torch.save(result, Path(store_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo_job(job: Callable[[], Any], timeout_s: float = 80.0) -> list[Any]:
    """``job()`` on each of 2 gloo ranks; the list of what each rank returned, rank 0 first.

    ``job`` must be a module-level function (the spawn start method pickles it by name)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="fx_indexcache_gloo_") as store_dir:
        context = mp.start_processes(_worker, args=(job, store_dir), nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"the 2-process gloo job did not finish within {timeout_s:.0f} s")
        return [torch.load(Path(store_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def parallel_suite_job() -> dict:
    """Every 2-process case of the parallelism test modules, by module."""
    import test_pipeline_parallel
    import test_sharded_indexer
    import test_tensor_parallel

    return {"tensor parallel": test_tensor_parallel.tensor_parallel_job(),
            "sharded indexer": test_sharded_indexer.sharded_job(),
            "pipeline": test_pipeline_parallel.pipeline_job()}


@functools.lru_cache(maxsize=None)
def _parallel_suite() -> tuple:
    return tuple(run_gloo_job(parallel_suite_job, timeout_s=150.0))


def parallel_results(part: str) -> list[Any]:
    """Per rank, what ``part``'s job returned; the session's one job runs on first use."""
    if not gloo_available():
        pytest.skip("torch.distributed with the gloo backend is unavailable")
    return [results[part] for results in _parallel_suite()]
