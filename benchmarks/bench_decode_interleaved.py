"""Decode, ours against the hand-written IndexCache at the same pattern: interleaved timing and GPU kernel time.

Run d1 of ``bench_gpu_indexcache.py`` (H100, torch 2.11) found ours_f8 up to 1.5x slower than hand_f8 in decode,
while in prefill the two matched within 1 %, and some decode times fell as the context grew. This script asks,
on one card and in one process, with every variant compiled and alive together:

1. Is a decode step bound by the host or by the GPU? torch.profiler's summed device time of one step's kernels
   against the step's event-timed wall time (``gpu_busy`` = their ratio).
2. Do the gaps survive interleaving? Variants are timed in rounds (A, B, C, A, B, C, ...), each round the median of
   ``--calls`` event-timed calls; the table gives the median over rounds and the spread of the rounds.

Variants (pattern FSSSSS: ``index_topk_freq=8``, ``index_skip_topk_offset=1`` over 6 layers):
  hand_f8       the model's own IndexCache (``set_index_cache_pattern``) under plain Inductor; its S layers skip
                the whole indexer, the indexer-key cache write included
  ours_f8       ``indexcache_backend``, defaults: S layers keep their indexer-key cache writes
  ours_f8_drop  the same with ``drop_shared_indexer_cache_writes=True``: the same work as hand_f8

    PYTHONPATH=. python benchmarks/bench_decode_interleaved.py --out "$OUT"

``--smoke`` runs it on the CPU with the tiny config (a check of the script: no device times there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from benchmarks.bench_gpu_indexcache import Runner, compile_variant  # noqa: E402

VARIANTS = ("hand_f8", "ours_f8", "ours_f8_drop")


def device_time_ms(fn, calls: int) -> tuple[float | None, float | None]:
    """(summed kernel time per call in ms, kernels per call) from torch.profiler; (None, None) without a GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None, None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    total_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) for e in kernels)
    return total_us / 1e3 / calls, sum(e.count for e in kernels) / calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"), required="OUT" not in os.environ,
                    help="folder for this run's files (default $OUT); nothing is written into the checkout unasked")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    torch._inductor.config.fx_graph_cache = False
    runner = Runner(SimpleNamespace(out=a.out, budget_s=1e9, smoke=a.smoke, layers=6, run_label="interleaved"))
    runner.log_f = open(os.path.join(a.out, "decode_interleaved_log.txt"), "a")
    runner.build()
    points = [(4, 128), (2, 512), (2, 128)] if a.smoke else [(64, 32768), (16, 32768), (16, 8192)]
    caches = {(B, T): runner.filled_cache(B, T) for (B, T) in points}
    fns, compile_s = {}, {}
    for name in VARIANTS:
        fns[name] = compile_variant(name, runner.model, runner.L, own_code=True)  # all three stay compiled
        B, T = points[0]
        ids = torch.zeros(B, 1, dtype=torch.long, device=runner.dev)
        t = time.time()
        with torch.no_grad():
            fns[name](ids, caches[(B, T)], T - 1)
        runner.sync()
        compile_s[name] = round(time.time() - t, 1)
        runner.log(f"{name}: compiled in {compile_s[name]} s")
    rows = []
    for (B, T) in points:
        ids = torch.randint(0, runner.cfg.vocab_size, (B, 1), device=runner.dev,
                            generator=torch.Generator(device=runner.dev).manual_seed(B + T))
        calls = {n: (lambda f=f: f(ids, caches[(B, T)], T - 1)) for n, f in fns.items()}
        rounds = {n: [] for n in VARIANTS}
        with torch.no_grad():
            for n in VARIANTS:  # warm-up (a new size may specialise once more)
                calls[n]()
            for _ in range(a.rounds):
                for n in VARIANTS:
                    ms, _, _ = runner.time_calls(calls[n], target_s=0.0, max_reps=a.calls, min_reps=a.calls)
                    rounds[n].append(ms)
            for n in VARIANTS:
                dev_ms, kernels = device_time_ms(calls[n], a.calls)
                med = statistics.median(rounds[n])
                row = dict(point=runner.label("decode", B, 1, T), variant=n, ms=round(med, 3),
                           round_min=round(min(rounds[n]), 3), round_max=round(max(rounds[n]), 3),
                           kernel_ms=None if dev_ms is None else round(dev_ms, 3),
                           kernels_per_step=kernels, gpu_busy=None if dev_ms is None else round(dev_ms / med, 3))
                rows.append(row)
                runner.log(f"{row['point']:14s} {n:13s} {med:8.3f} ms (rounds {row['round_min']}-{row['round_max']})"
                           f"  kernels {kernels} summing {row['kernel_ms']} ms  gpu busy {row['gpu_busy']}")
    for r in rows:
        hand = next(h for h in rows if h["point"] == r["point"] and h["variant"] == "hand_f8")
        r["hand_over_this"] = round(hand["ms"] / r["ms"], 3)
        if r["kernel_ms"] and hand["kernel_ms"]:
            r["hand_over_this_kernel_time"] = round(hand["kernel_ms"] / r["kernel_ms"], 3)
    with open(os.path.join(a.out, "decode_interleaved.json"), "w") as f:
        json.dump(dict(env=runner.env, compile_s=compile_s, rows=rows, rounds=a.rounds, calls=a.calls), f, indent=1)
    cols = ["point", "variant", "ms", "round_min", "round_max", "hand_over_this", "kernel_ms", "kernels_per_step",
            "gpu_busy", "hand_over_this_kernel_time"]
    lines = ["# Decode: ours vs hand-written IndexCache (FSSSSS), interleaved", "",
             "Environment: " + ", ".join(f"{k}={v}" for k, v in runner.env.items()), "",
             f"{a.rounds} interleaved rounds of {a.calls} event-timed calls; ms = median over rounds. kernel_ms = "
             "torch.profiler's summed device time of one step's kernels; gpu_busy = kernel_ms / ms.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    with open(os.path.join(a.out, "decode_interleaved.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
