"""Sweep the logits kernel's launch configurations on this card and write the fastest per shape as data.

``default_config`` picks a launch shape from rules measured on an H100 for bf16. fp8 scoring (issue 28 item 3: at
or under DeepGEMM's time at 1K x 32K and 1K x 128K) and other cards want their own: this script times every
``LogitsConfig`` of a grid on V3.2's indexer (64 heads x 128, causal, keys of unequal size) for each shape and
precision (kinds: "prefill" and "decode", the contiguous kernels; "paged", ``paged_decode`` over pages of 64 keys
in a shuffled block table), by CUDA-graph replay (``triton.testing.do_bench_cudagraph`` medians), checks each config's logits
against the default's (equal up to the summation order: ``rtol`` 1e-4), and writes

* ``<out>/logits_configs_<card>.json``: per (precision, kind, B, S, T) the fastest config and its time, the
  default's time, every config's time (``timings``), and the machine (``bench_environment``); the file
  ``lightning_indexer.tuned_config`` reads when it lies in ``fx_indexcache/fuse/kernels/configs/`` (commit it there);
* ``<out>/logits_configs.md``: the table, with card, driver, torch, Triton and commit;
* ``<out>/results_rows.csv``: the default's and the best config's time per shape, for
  ``python scripts/results_tables.py --add``;
* with ``--merge-into DIR``, each shape's row also into ``DIR``'s card file, replacing the row of the same
  precision, kind and shape (later steps of the run launch with what was measured).

The "default" each config is compared with is the rules' (``rule_config``; paged: ``paged_decode.RULE_CONFIGS`` as
``fill_the_card`` fits it to the shape).

Usage (repository root, one CUDA card)::

    PYTHONPATH=. python benchmarks/sweep_logits_configs.py --out "$OUT" [--quick] [--precision fp8] [--kinds decode,paged] \
        [--merge-into fx_indexcache/fuse/kernels/configs]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fx_indexcache.fuse.kernels import indexer_fp8 as f8  # noqa: E402
from fx_indexcache.fuse.kernels import lightning_indexer as li  # noqa: E402
from fx_indexcache.fuse.kernels import paged_decode as pd  # noqa: E402

from bench_environment import describe_machine, graph_replay_us, write_result_rows  # noqa: E402
from bench_indexer_fp8 import D, H, _inputs, paged_pool  # noqa: E402  (V3.2's shapes, keys of unequal size)

#: Issue 28's shapes: prefill 1K x 32K and 1K x 128K; decode (contiguous keys and paged) at B1 / B16 / B64 x 32K and
#: B4 x 128K.
DECODE_SHAPES = [(1, 1, 32768), (16, 1, 32768), (64, 1, 32768), (4, 1, 131072)]
SHAPES = ([("prefill", 1, 1024, 32768), ("prefill", 1, 1024, 131072)] + [("decode", *s) for s in DECODE_SHAPES]
          + [("paged", *s) for s in DECODE_SHAPES])
KINDS = ("prefill", "decode", "paged")
PREFILL_GRID = dict(block_s=(64, 128), block_t=(64, 128, 256), num_warps=(4, 8), num_stages=(2, 3, 4),
                    heads_per_step=(1, 2))
#: Decode: one query a program; 1-8 key blocks a program (looped, the next block loading during this one's product).
DECODE_GRID = dict(block_s=(1,), block_t=(64, 128, 256), num_warps=(4, 8), num_stages=(2, 3), key_blocks=(1, 2, 4, 8))
#: The paged kernel (pages of ``PAGE`` keys in a shuffled block table): its blocks gather pages row by row; its
#: key-rows launches take ``KEY_ROWS_DECODE_GRID``.
PAGED_GRID = dict(block_s=(1,), block_t=(64, 128), num_warps=(4, 8), num_stages=(2, 3), key_blocks=(1, 2, 4, 8))
PAGE = 64
#: The key-rows prefill kernel: (block_t, queries_per_dot, num_warps) that compile without spills for sm_90 under
#: Triton 3.6 (2-7 programs an SM), 64 or 128 queries a program, 2 or 3 stages.
KEY_ROWS_SHAPES = ((64, 1, 4), (64, 2, 8), (128, 1, 4), (128, 1, 8), (128, 2, 8), (256, 1, 8))
KEY_ROWS_GRID = dict(block_s=(64, 128), num_stages=(2, 3))
#: ... and for decode: one query's heads as the N side (the head sum stays in a thread's registers, not across warps),
#: 1-8 key blocks a program.
KEY_ROWS_DECODE_GRID = dict(block_s=(1,), block_t=(64, 128), num_warps=(4,), num_stages=(1, 2, 3), key_blocks=(1, 2, 4, 8))


def configs(kind: str):
    if kind == "paged":  # heads on the M side, then keys (pages gathered either way)
        for values in itertools.product(*PAGED_GRID.values()):
            yield li.LogitsConfig("decode", **dict(zip(PAGED_GRID, values)))
        for values in itertools.product(*KEY_ROWS_DECODE_GRID.values()):
            yield li.LogitsConfig("key_rows", **dict(zip(KEY_ROWS_DECODE_GRID, values)))
        return
    grid, key_rows = (PREFILL_GRID, None) if kind == "prefill" else (DECODE_GRID, KEY_ROWS_DECODE_GRID)
    for values in itertools.product(*grid.values()):
        yield li.LogitsConfig(kind, **dict(zip(grid, values)))
    if key_rows is not None:
        for values in itertools.product(*key_rows.values()):
            yield li.LogitsConfig("key_rows", **dict(zip(key_rows, values)))
        return
    for (block_t, per_dot, warps), block_s, stages in itertools.product(KEY_ROWS_SHAPES, *KEY_ROWS_GRID.values()):
        yield li.LogitsConfig("key_rows", block_s, block_t, warps, stages, queries_per_dot=per_dot)


def paged_operands(q, k, w, scale, precision: str):
    """The contiguous kernel's operands for ``paged_decode_logits``: keys (and fp8 scales) in a shuffled pool of
    ``PAGE``-token pages (``bench_indexer_fp8.paged_pool``), the weights with ``scale`` folded in as the paged
    kernel takes them: ``(q, pool, weights, table, lens, pool_scales)``."""
    if precision == "fp8":
        ops = f8.quantize_operands(q, k, w, scale)
        q, k, w, k_scale = ops.q8, ops.k8, ops.weights, ops.k_scale
    else:
        w, k_scale = (w.float() * scale).contiguous(), None
    pool, scales, table, lens = paged_pool(k, k_scale, PAGE)
    return q, pool, w, table, lens, scales


def parse_restrictions(items: list) -> dict:
    """``["block_t=64,128", ...]`` as ``{"block_t": {64, 128}}``, each field a ``LogitsConfig`` field."""
    fields = [f.name for f in dataclasses.fields(li.LogitsConfig)]
    restrict: dict = {}
    for item in items:
        field, _, values = item.partition("=")
        if field not in fields or not values:
            raise ValueError(f"--restrict {item!r}: FIELD=V1,V2 with FIELD one of {', '.join(fields)}")
        try:
            restrict[field] = {v if field == "kind" else int(v) for v in values.split(",")}
        except ValueError:
            raise ValueError(f"--restrict {item!r}: {field} takes integers") from None
    return restrict


def sweep(precision: str, kind: str, B: int, S: int, T: int, log, restrict: Optional[dict] = None) -> dict:
    q, k, w = _inputs(B, S, T)
    scale = D**-0.5
    out = torch.empty(B, S, T, device="cuda")
    if kind == "paged":
        pq, pool, pw, table, lens, scales = paged_operands(q, k, w, scale, precision)

        def run(cfg):
            return lambda: pd.paged_decode_logits(pq, pool, pw, table, lens, k_scale=scales, out=out, config=cfg)

        default = li.fill_the_card(pd.RULE_CONFIGS[precision], B * S, T, li.device_sms(q.device))
    else:
        if precision == "fp8":
            ops = f8.quantize_operands(q, k, w, scale)
            q, k, w, k_scale, scale = ops.q8, ops.k8, ops.weights, ops.k_scale, 1.0
        else:
            k_scale = None

        def run(cfg):
            return lambda: li._launch(q, k, w, out, True, scale, None, cfg, k_scale=k_scale)

        default = li.rule_config(B, S, T, H, D, q.device, precision)
    run(default)()
    want = out.clone()
    timed = [(default, graph_replay_us(run(default)))]
    for cfg in configs(kind):
        if cfg == default or any(getattr(cfg, field) not in values for field, values in (restrict or {}).items()):
            continue
        try:
            run(cfg)()
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-3, equal_nan=True)
            timed.append((cfg, graph_replay_us(run(cfg))))
        except Exception as e:  # a config that does not compile (shared memory) or disagrees is left out
            log(f"  {cfg.name()}: left out ({type(e).__name__}: {str(e)[:120]})")
    best, best_us = min(timed, key=lambda item: item[1])
    log(f"{precision} {kind} {B}x{S}x{T}: default {default.name()} {timed[0][1]:.1f} us, best {best.name()} "
        f"{best_us:.1f} us ({len(timed)} configs)")
    return dict(precision=precision, kind=kind, B=B, S=S, T=T, default=default.name(), default_us=timed[0][1],
                best=dataclasses.asdict(best), best_name=best.name(), best_us=best_us,
                configs_timed=len(timed), timings={cfg.name(): round(us, 1) for cfg, us in timed})


def grids() -> dict:
    """The configurations swept, as the card files record them."""
    return dict(prefill=PREFILL_GRID, decode=DECODE_GRID, paged=PAGED_GRID, paged_key_rows=KEY_ROWS_DECODE_GRID,
                key_rows=dict(KEY_ROWS_GRID, shapes=KEY_ROWS_SHAPES), key_rows_decode=KEY_ROWS_DECODE_GRID)


def merge_rows(path: Path, env: dict, rows: list) -> None:
    """Write ``rows`` into the card file at ``path``, replacing its rows of the same precision, kind and shape and
    keeping the others (each row carries the machine it was measured on)."""
    def key(row):
        return row["precision"], row["kind"], row["B"], row["S"], row["T"]

    old = json.loads(path.read_text()) if path.is_file() else {}
    kept_env = old.get("env", {})
    kept = [dict(r, env=r.get("env", kept_env)) for r in old.get("rows", [])]
    new = {key(r): dict(r, env=env) for r in rows}
    merged = [r for r in kept if key(r) not in new] + list(new.values())
    merged.sort(key=lambda r: (KINDS.index(r["kind"]), r["precision"], r["B"] * r["S"], r["T"]))
    path.write_text(json.dumps(dict(env=env, rows=merged, grid=grids()), indent=1, default=str) + "\n")


def write_files(out: Path, env: dict, rows: list, seconds: float) -> None:
    """The card's json, the markdown table and the results-table rows of the shapes swept so far."""
    data = dict(env=env, rows=rows, grid=grids(), seconds=round(seconds, 1))
    (out / li.card_file_name(env["device"])).write_text(json.dumps(data, indent=1, default=str))
    lines = [f"# Logits kernel launch configurations: {env['device']}, driver {env['driver']}, torch {env['torch']}, "
             f"Triton {env['triton']}, commit {env['commit'][:12]}, {env['date']}", "",
             "| precision | shape | default | µs | best | µs | speedup |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['kind']} {r['B']}×{r['S']}×{r['T']} | {r['default']} | {r['default_us']:.1f} | "
              f"{r['best_name']} | {r['best_us']:.1f} | {r['default_us'] / r['best_us']:.2f} |" for r in rows]
    (out / "logits_configs.md").write_text("\n".join(lines) + "\n")
    values = [(f"{r['kind']} {r['B']}×{r['S']}×{r['T']}", f"{r['precision']}_{which}", "us", r[f"{which}_us"], "us")
              for r in rows for which in ("default", "best")]
    write_result_rows(out / "results_rows.csv", "logits_launch_configs", env, "benchmarks/sweep_logits_configs.py",
                      values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for this run's files")
    parser.add_argument("--quick", action="store_true", help="the first prefill and decode shapes only")
    parser.add_argument("--precision", choices=("bf16", "fp8", "both"), default="both")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"shape kinds to sweep, of {', '.join(KINDS)}")
    parser.add_argument("--restrict", action="append", default=[], metavar="FIELD=V1,V2",
                        help="time only configurations whose LogitsConfig FIELD is one of these values (repeatable; "
                        "a grid's neighbourhood of a known best, e.g. block_t=128)")
    parser.add_argument("--merge-into", type=Path, default=None,
                        help="also merge each shape's row into this folder's card file (the package's configs/ "
                        "folder: later steps of the same run, and a commit of the file, use what was measured)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sweep_logits_configs: needs a CUDA GPU")
        return 0
    env = describe_machine()
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "logits_configs_log.txt").open("w")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    precisions = ("bf16", "fp8") if args.precision == "both" else (args.precision,)
    kinds = set(args.kinds.split(","))
    if not kinds <= set(KINDS):
        parser.error(f"--kinds {args.kinds!r}: each must be one of {', '.join(KINDS)}")
    shapes = [shape for shape in ([SHAPES[0], SHAPES[2]] if args.quick else SHAPES) if shape[0] in kinds]
    try:
        restrict = parse_restrictions(args.restrict)
    except ValueError as e:
        parser.error(str(e))
    rows, started = [], time.time()
    for precision, (kind, B, S, T) in itertools.product(precisions, shapes):
        rows.append(sweep(precision, kind, B, S, T, log, restrict))
        torch.cuda.empty_cache()
        write_files(args.out, env, rows, time.time() - started)  # after each shape: a run cut short keeps them
        if args.merge_into is not None:
            merge_rows(args.merge_into / li.card_file_name(env["device"]), env, rows[-1:])
            li._tuned_rows.cache_clear()
    print((args.out / "logits_configs.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
