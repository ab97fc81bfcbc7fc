"""Score + top-k in one pass (``indexer_topk_fused``) against our two kernels (``indexer_logits`` + ``indexer_topk``).

Run from the repository root on a CUDA machine (no internet needed)::

    python benchmarks/bench_fused_score_topk.py [--out DIR] [--quick] [--no-record] [--sanitize] [--prefill-launches]

For the issue's shapes (bf16, DeepSeek-V3.2 indexer: H = 64, D = 128, k = 2048, causal), each replayed in a
CUDA graph (``triton.testing.do_bench_cudagraph`` medians, us): the logits alone, logits + our top-k (the
two-kernel path the substitution inserts where the logits are read), and the fused op; unsorted (what a sparse
attention consumes) and, for the fused op, sorted. Before timing, every shape's fused indices are checked
against the two-kernel path's (the same set but for near-ties; how many rows differ is printed, and what the
differing keys' scores are). Prints a markdown table headed by the card, driver, torch, Triton and commit
(``bench_environment``), writes it and ``results_rows.csv`` (one row of the results table per figure,
``bench_environment.write_result_rows``) under ``--out`` (default ``$OUT``, else ``./bench_out``), and merges those
rows into this checkout's ``benchmarks/results/results.csv`` (``scripts/results_tables.add_rows``; ``--no-record``
skips that; on the device machine, whose copy of the checkout does not come back, merge the returned file with
``python scripts/results_tables.py --add OUT/results_rows.csv``). ``--sanitize``: small checks only, no timing,
for a run under ``compute-sanitizer`` (``tests/gpu/test_fused_score_topk_gpu.py`` runs it so).
``--prefill-launches``: the atomic filter's prefill launches (``PREFILL_CANDIDATES``) side by side, and where the
atomic launch's time goes kernel by kernel (``fused_score_topk_launches.md``). Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_environment import graph_replay_us, kernel_times  # noqa: E402
from bench_indexer_kernel import D, H, TOPK, make_inputs  # noqa: E402  (V3.2's indexer, bf16 inputs)

SCALE = D**-0.5
#: (name, B, S, T): the issue's prefill and decode shapes.
SHAPES = [
    ("prefill", 1, 1024, 32768),
    ("prefill", 1, 1024, 131072),
    ("decode", 1, 1, 32768),
    ("decode", 16, 1, 32768),
    ("decode", 64, 1, 32768),
    ("decode", 4, 1, 131072),
]
QUICK = [SHAPES[0], SHAPES[2], SHAPES[3]]
#: (B, S, T, k) for ``--sanitize``: every layout and the select in the last program, a few hundred keys.
SANITIZE_SHAPES = [(1, 1, 5000, 64), (3, 1, 3000, 64), (1, 40, 3000, 64), (2, 24, 1500, 2048)]


#: The fused op's launches timed, by the variant name their figures carry in the results table: the atomic filter's
#: (prefill 64 queries x 256 keys on 8 warps: compiled for sm_90 by Triton 3.6, 255 registers and 80 bytes of
#: spill), the same with 32-query prefill tiles (196 registers, none; decode keeps its tiles, so prefill only) and
#: the scan filter's, the default (64-key prefill tiles). Until commit b7c448f the variant "fused" was the default.
LAUNCHES = ("fused_atomic", "fused_atomic_s32", "fused_scan")


#: Prefill launches of the atomic filter ``--prefill-launches`` times side by side: (queries, keys, warps, stages).
PREFILL_CANDIDATES = ((64, 256, 8, 3), (64, 256, 8, 4), (64, 256, 8, 2), (128, 128, 8, 3), (64, 128, 8, 3))


def launch_config(launch: str, B: int, S: int, T: int):
    """The ``FusedTopkConfig`` of ``launch`` (one of ``LAUNCHES``) at a shape; None where it is not timed there."""
    import dataclasses

    from fx_indexcache.fuse.kernels import fused_score_topk as fz

    if launch == "fused_scan":
        return fz.default_fused_config(B, S, T, H, D, filter="scan")
    cfg = fz.default_fused_config(B, S, T, H, D, filter="atomic")
    if launch == "fused_atomic_s32":
        return dataclasses.replace(cfg, block_s=32) if cfg.kind == "prefill" else None
    return cfg


def compare(q, k, w, topk: int, sorted_: bool = False, config=None) -> tuple[int, int, float]:
    """(rows, rows whose fused set (of the launch ``config``, else the default's) differs from the two-kernel path's,
    the largest |score - k-th score| over the keys only one of them picked, relative to the row's k-th score):
    differences must be near-ties only."""
    from fx_indexcache.fuse.kernels.fused_score_topk import indexer_topk_fused
    from fx_indexcache.fuse.kernels.lightning_indexer import indexer_logits, indexer_topk

    logits = indexer_logits(q, k, w, causal=True, scale=SCALE)
    two = indexer_topk(logits, topk, sorted=sorted_)
    one = indexer_topk_fused(q, k, w, topk, causal=True, scale=SCALE, sorted=sorted_, config=config)
    kk = two.shape[-1]
    x = logits.reshape(-1, logits.shape[-1])
    a, b = two.reshape(-1, kk).long(), one.reshape(-1, kk).long()
    assert bool(((b >= 0) & (b < x.shape[1])).all()), "fused indices out of range"
    same = torch.zeros_like(x, dtype=torch.int8)
    same.scatter_add_(1, a, torch.ones_like(a, dtype=torch.int8))
    same.scatter_add_(1, b, torch.ones_like(b, dtype=torch.int8))
    differ = (same == 1)
    rows = int(differ.any(1).sum())
    kth = torch.topk(x, kk, dim=1).values[:, -1:]
    gap = ((x - kth).abs() / kth.abs().clamp_min(1e-30)).masked_fill(~differ, 0).nan_to_num(0.0)
    if sorted_:
        v = torch.gather(x, 1, b)
        assert bool((v[:, 1:] <= v[:, :-1]).all()), "sorted fused output is not descending"
    return x.shape[0], rows, float(gap.max()) if rows else 0.0


def time_shape(kind, B, S, T) -> dict:
    from fx_indexcache.fuse.kernels.fused_score_topk import indexer_topk_fused
    from fx_indexcache.fuse.kernels.lightning_indexer import indexer_logits, indexer_topk

    q, k, w = make_inputs(B, S, T, seed=B + S + T)
    out = torch.empty(B, S, T, device="cuda")
    row: dict = dict(kind=kind, shape=f"{B}x{S}x{T // 1024}K", differ={}, gap={})
    configs = {launch: launch_config(launch, B, S, T) for launch in LAUNCHES}
    configs = {launch: cfg for launch, cfg in configs.items() if cfg is not None}
    for launch, cfg in configs.items():
        row["rows"], row["differ"][launch], row["gap"][launch] = compare(q, k, w, TOPK, config=cfg)

    def fused(cfg, sorted_):
        return lambda: indexer_topk_fused(q, k, w, TOPK, causal=True, scale=SCALE, sorted=sorted_, config=cfg)

    variants = [
        ("logits", lambda: indexer_logits(q, k, w, scale=SCALE, out=out)),
        ("logits_topk", lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK, sorted=False)),
    ]
    for launch, cfg in configs.items():
        variants.append((launch, fused(cfg, False)))
        if launch != "fused_atomic_s32":
            variants.append((f"{launch}_sorted", fused(cfg, True)))
    for name, fn in variants:
        try:
            row[name] = graph_replay_us(fn)
        except Exception as e:  # reported, not fatal: the other figures still count
            row[name] = None
            print(f"{row['shape']} {name}: timing failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    del q, k, w, out
    torch.cuda.empty_cache()
    return row


def time_prefill_launches(B: int, S: int, T: int) -> dict:
    """``PREFILL_CANDIDATES`` at one prefill shape: each launch's set check and time, the two kernels' times, and
    the atomic filter's launch (``default_fused_config(..., filter="atomic")``) time by kernel."""
    from fx_indexcache.fuse.kernels import fused_score_topk as fz
    from fx_indexcache.fuse.kernels.lightning_indexer import indexer_logits, indexer_topk

    q, k, w = make_inputs(B, S, T, seed=B + S + T)
    out = torch.empty(B, S, T, device="cuda")
    row: dict = dict(shape=f"{B}x{S}x{T // 1024}K", launches={}, differ={})
    row["logits"] = graph_replay_us(lambda: indexer_logits(q, k, w, scale=SCALE, out=out))
    row["logits_topk"] = graph_replay_us(
        lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK, sorted=False))
    atomic = fz.default_fused_config(B, S, T, H, D, filter="atomic")
    for block_s, block_t, warps, stages in PREFILL_CANDIDATES:
        cfg = fz.FusedTopkConfig("prefill", block_s, block_t, 128, warps, stages, 8, filter="atomic")
        try:
            _, row["differ"][cfg.name()], _ = compare(q, k, w, TOPK, config=cfg)
            fn = (lambda c: lambda: fz.indexer_topk_fused(q, k, w, TOPK, causal=True, scale=SCALE, config=c))(cfg)
            row["launches"][cfg.name()] = graph_replay_us(fn)
            if cfg == atomic:
                kernels_ms = kernel_times(fn, reps=5)
                row["profiled"], row["kernels"] = cfg.name(), {name: 1e3 * ms for name, ms in kernels_ms.items()}
        except Exception as e:  # reported, not fatal: the other launches still count
            print(f"{row['shape']} {cfg.name()}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    del q, k, w, out
    torch.cuda.empty_cache()
    return row


def launches_markdown(env: dict, rows: list[dict]) -> str:
    """The ``--prefill-launches`` table: each launch against the two kernels, then the profiled launch's kernels."""
    lines = [f"card {env['device']}, driver {env['driver']}, torch {env['torch']}, Triton {env['triton']}, commit "
             f"{env['commit']}, {env['date']}; the atomic filter's prefill launches, CUDA-graph replay medians (us)",
             "", "| shape | launch | us | vs logits + top-k | rows differing |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | logits / logits + top-k | {r['logits']:.1f} / {r['logits_topk']:.1f} | | |")
        for name, us in r["launches"].items():
            mark = " (default_fused_config's, profiled)" if name == r.get("profiled") else ""
            lines.append(f"| {r['shape']} | {name}{mark} | {us:.1f} | {r['logits_topk'] / us:.2f}x | "
                         f"{r['differ'][name]} |")
        for kernel, us in r.get("kernels", {}).items():
            lines.append(f"| {r['shape']} | its kernel {kernel} | {us:.1f} | | |")
    return "\n".join(lines)


def launch_values(rows: list[dict]) -> list[tuple]:
    """``(shape, variant, metric, value, unit)`` of every ``--prefill-launches`` figure."""
    values = []
    for r in rows:
        values += [(r["shape"], "logits", "us", r["logits"], "us"), (r["shape"], "logits_topk", "us", r["logits_topk"], "us")]
        values += [(r["shape"], name, "us", us, "us") for name, us in r["launches"].items()]
        values += [(r["shape"], f"{r['profiled']} kernel {kernel}", "us", us, "us")
                   for kernel, us in r.get("kernels", {}).items()]
    return values


def markdown(env: dict, rows: list[dict]) -> str:
    head = (f"card {env['device']}, driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}, Triton "
            f"{env['triton']}, commit {env['commit']}, {env['date']}; bf16, H={H}, D={D}, k={TOPK}, causal, "
            "CUDA-graph replay medians (us), unsorted unless said")
    lines = [head, "", "| shape | logits | logits + top-k | one op, atomic filter: unsorted / sorted | "
             "atomic, 32 queries a prefill tile | scan filter (default): unsorted / sorted | speed-up vs logits + top-k "
             "(atomic / scan) | rows differing: atomic, atomic 32, scan (max rel. gap) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v):
        return "-" if v is None else f"{v:.1f}"

    def up(r, variant):
        return "-" if not (r.get("logits_topk") and r.get(variant)) else f"{r['logits_topk'] / r[variant]:.2f}x"

    for r in rows:
        differ = ", ".join(f"{r['differ'][n]}" if n in r["differ"] else "-" for n in LAUNCHES)
        gap = max(r["gap"].values())
        lines.append(f"| {r['shape']} | {f(r['logits'])} | {f(r['logits_topk'])} | {f(r.get('fused_atomic'))} / "
                     f"{f(r.get('fused_atomic_sorted'))} | {f(r.get('fused_atomic_s32'))} | {f(r.get('fused_scan'))} / "
                     f"{f(r.get('fused_scan_sorted'))} | {up(r, 'fused_atomic')} / {up(r, 'fused_scan')} | "
                     f"{differ} of {r['rows']} ({gap:.1e}) |")
    return "\n".join(lines)


def result_values(rows: list[dict]) -> list[tuple]:
    """``(shape, variant, metric, value, unit)`` of every figure (a failed timing holds none)."""
    values = []
    timed = ("logits", "logits_topk") + tuple(v for n in LAUNCHES for v in (n, f"{n}_sorted"))
    for r in rows:
        values += [(r["shape"], variant, "us", r.get(variant), "us") for variant in timed if variant in r]
        values += [(r["shape"], launch, "rows_differing", differ / max(1, r["rows"]), "fraction")
                   for launch, differ in r["differ"].items()]
    return values


def sanitize() -> int:
    """Small shapes through every launch plan, checked against the two-kernel path; no timing."""
    from fx_indexcache.fuse.kernels import fused_score_topk as fz

    bad = 0
    for B, S, T, k in SANITIZE_SHAPES:
        q, k_, w = make_inputs(B, S, T, seed=T)
        for filter_ in fz.FILTERS:
            cfg = fz.default_fused_config(B, S, T, H, D, filter=filter_)
            for sorted_ in (False, True):
                n, differ, gap = compare(q, k_, w, k, sorted_, config=cfg)
                ok = gap < 1e-3
                bad += not ok
                print(f"sanitize {B}x{S}x{T} k={k} {filter_} sorted={sorted_}: {differ}/{n} rows differ "
                      f"(gap {gap:.1e}){'' if ok else '  FAIL'}", flush=True)
    torch.cuda.synchronize()
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")),
                    help="folder for the table and results_rows.csv (default $OUT, else ./bench_out)")
    ap.add_argument("--quick", action="store_true", help="three shapes only")
    ap.add_argument("--no-record", action="store_true", help="print only; leave results.csv as it is")
    ap.add_argument("--sanitize", action="store_true", help="small checks only, for compute-sanitizer")
    ap.add_argument("--prefill-launches", action="store_true",
                    help="the atomic filter's prefill launches (PREFILL_CANDIDATES) at the prefill shapes, and the "
                         "atomic launch's time by kernel, instead of the main table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_fused_score_topk: no CUDA device here; nothing to measure")
        return 0
    if args.sanitize:
        return sanitize()
    from bench_environment import _results_tables, describe_machine, write_result_rows

    env = describe_machine()
    rows = []
    if args.prefill_launches:
        shapes = [(B, S, T) for kind, B, S, T in SHAPES if kind == "prefill"]
        for B, S, T in shapes[:1] if args.quick else shapes:
            rows.append(time_prefill_launches(B, S, T))
            print(rows[-1], flush=True)
        benchmark, name, table, values = ("fused_score_topk_launches", "fused_score_topk_launches.md",
                                          launches_markdown(env, rows), launch_values(rows))
    else:
        for kind, B, S, T in QUICK if args.quick else SHAPES:
            t0 = time.time()
            rows.append(time_shape(kind, B, S, T))
            print(f"{rows[-1]} ({time.time() - t0:.0f} s)", flush=True)
        benchmark, name, table, values = ("fused_score_topk", "fused_score_topk.md", markdown(env, rows),
                                          result_values(rows))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / name).write_text(table + "\n")
    fragment = args.out / "results_rows.csv"
    n = write_result_rows(fragment, benchmark, env, "benchmarks/bench_fused_score_topk.py", values)
    print(f"{n} rows in {fragment}")
    if not args.no_record:
        added = _results_tables().add_rows([fragment])
        print(f"benchmarks/results/results.csv: {added} new row(s) (elsewhere: python scripts/results_tables.py "
              f"--add {fragment})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
