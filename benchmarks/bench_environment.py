"""What every benchmark record names: the card, its driver, torch, CUDA, Triton, the commit measured and the date.

``BENCH_COMMIT`` gives the commit where the tree has no ``.git`` or a stale one (the device machine gets a copy of
the files, and its ``.git`` may name an older commit): a tree whose tracked files differ from ``HEAD`` is recorded as
``<HEAD>-dirty``, never as ``HEAD`` itself.
"""

from __future__ import annotations

import os
import subprocess
import time

import torch


def _run(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _git_commit() -> str:
    """HEAD, with "-dirty" where a tracked file differs from it (then HEAD is not what was measured)."""
    head = _run(["git", "rev-parse", "HEAD"])
    if not head:
        return "unknown"
    try:
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], timeout=60,
                               cwd=os.path.dirname(os.path.abspath(__file__))).returncode == 0
    except (OSError, subprocess.SubprocessError):
        clean = False
    return head if clean else head + "-dirty"


def describe_machine() -> dict:
    """``{device, driver, torch, cuda, triton, commit, date}``; a part that cannot be read says "unknown"."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "unknown"
    cuda = torch.cuda.is_available()
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "unknown" if cuda else "-"
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "triton": triton_version,
        "commit": os.environ.get("BENCH_COMMIT") or _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def graph_replay_us(fn, rep: int = 50) -> float:
    """Median time of ``fn`` replayed in a CUDA graph, in µs (``triton.testing.do_bench_cudagraph``)."""
    from triton.testing import do_bench_cudagraph

    return 1e3 * float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def _results_tables():
    """``scripts/results_tables.py`` (not a package), where the results table's columns and writer live."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "results_tables.py"
    spec = importlib.util.spec_from_file_location("results_tables", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("results_tables", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def short_commit(commit: str) -> str:
    """The 7-character form of ``commit``, keeping its "-dirty" mark (a cut to 7 characters dropped it, and a dirty
    tree's figures were filed under the clean commit)."""
    head, dirty, _ = commit.partition("-dirty")
    return head[:7] + dirty


def write_result_rows(path, benchmark: str, env: dict, source: str, values) -> int:
    """Write one run's figures as rows of the results table (``values``: ``(shape, variant, metric, value, unit)``
    tuples, a None value skipped) to ``path``; ``scripts/results_tables.py --add path`` merges them. Returns how
    many rows were written."""
    tables = _results_tables()
    device = env["device"] + (f", driver {env['driver']}" if env.get("driver") not in (None, "", "-") else "")
    rows = [dict(benchmark=benchmark, shape=shape, variant=variant, pattern="", metric=metric, value=f"{value:.4g}",
                 unit=unit, device=device, torch=env["torch"], triton=env["triton"], date=env["date"][:10],
                 commit=short_commit(env["commit"]), source=source)
            for shape, variant, metric, value, unit in values if value is not None]
    tables.write_rows(path, rows)
    return len(rows)


def kernel_times(fn, reps=20) -> dict:
    """Mean GPU time per call of each kernel ``fn`` launches (ms), from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)  # the name moved in torch 2.x
        if t:
            out[ev.key[:40]] = round(t / reps / 1e3, 4)
    return out
