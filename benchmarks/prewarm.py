"""Compile a benchmark's variants in parallel worker processes before it measures them.

A device command may run for 10 minutes, and Inductor compiles one variant of a V3.2-sized stack under CUDA graphs
in one to two minutes, one after another: a benchmark that compiles its variants in turn fits three or four.
Each worker runs the benchmark script itself with ``--compile-only --variants NAME``, so it compiles exactly what the
measuring process will, into one shared Inductor cache directory; the measuring process then hits the FX graph cache
and pays for the trace, not the code generation. The workers run at the same time on the host's cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def share_inductor_cache() -> str:
    """One Inductor cache directory for this process and the workers it starts (kept if the caller set one)."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_prewarm_"))


def prewarm(script: str, variants: list[str], args: list[str], log_dir: str, timeout_s: float,
            workers: int = 0) -> dict[str, dict]:
    """Run ``script --compile-only --variants NAME *args`` for every variant, at most ``workers`` at a time (0: all
    at once; each worker holds its own copy of the model on the card); per variant the seconds until it ended and its
    exit status ("timeout" when it was killed, "not started" when the time ran out first). Each worker's output goes
    to ``log_dir/NAME.txt``."""
    share_inductor_cache()
    os.makedirs(log_dir, exist_ok=True)
    width = min(len(variants), workers or len(variants))
    # Each worker's Inductor would start a compile pool of every core: share the cores out instead.
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(max(1, (os.cpu_count() or 2) // width)))
    waiting, procs, t0, result = list(variants), {}, time.time(), {}
    while (waiting or len(result) < len(procs)) and time.time() - t0 < timeout_s:
        while waiting and len(procs) - len(result) < width:
            name = waiting.pop(0)
            log = open(os.path.join(log_dir, f"{name}.txt"), "w")
            cmd = [sys.executable, os.path.abspath(script), "--compile-only", "--variants", name, *args]
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        for name, proc in procs.items():
            if name not in result and proc.poll() is not None:
                result[name] = dict(wall_s=round(time.time() - t0, 1), rc=proc.returncode)
        time.sleep(0.5)
    for name, proc in procs.items():
        if name not in result:
            proc.kill()
            result[name] = dict(wall_s=None, rc="timeout")
    for name in waiting:
        result[name] = dict(wall_s=None, rc="not started")
    return result


def describe(result: dict[str, dict]) -> str:
    return "prewarm (parallel worker compiles, s until done): " + ", ".join(
        f"{n} {w['wall_s']} rc={w['rc']}" for n, w in result.items())


def add_arguments(ap) -> None:
    """The prewarm flags every benchmark that uses this module takes."""
    ap.add_argument("--prewarm", action="store_true", help="compile the variants in parallel worker processes first")
    ap.add_argument("--prewarm-only", action="store_true", help="only that (another command measures, --warm-cache)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="use the FX graph cache in TORCHINDUCTOR_CACHE_DIR that an earlier --prewarm-only filled")
    ap.add_argument("--prewarm-timeout-s", type=float, default=330.0)
    ap.add_argument("--prewarm-workers", type=int, default=0,
                    help="at most this many worker compiles at once (0: all; each holds a model on the card)")
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)  # a worker


def uses_cache(a) -> bool:
    """Whether this process should read and write the FX graph cache (benchmarks turn it off otherwise, so a
    compile time is a cold one)."""
    return bool(a.prewarm or a.prewarm_only or a.warm_cache or a.compile_only)


def prewarm_if_asked(a, script: str, variants: list[str], worker_args: list[str]) -> dict[str, dict] | None:
    """The prewarm a benchmark's flags ask for (``--prewarm`` / ``--prewarm-only``), its time taken off
    ``a.budget_s`` (the budget counts from the start of the command); then the FX graph cache on or off for this
    process. Returns the workers' results, or None when no prewarm ran. With ``--prewarm-only`` the caller stops."""
    import torch

    warmed = None
    if a.prewarm or a.prewarm_only:
        t = time.time()
        warmed = prewarm(script, variants, worker_args, os.path.join(a.out, "prewarm"), a.prewarm_timeout_s,
                         a.prewarm_workers)
        a.budget_s -= time.time() - t
        print(describe(warmed), flush=True)
    # The FX graph cache is what the prewarm fills; without it every compile is a cold one.
    torch._inductor.config.fx_graph_cache = uses_cache(a)
    return warmed
