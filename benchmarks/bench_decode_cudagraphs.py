"""Decode under CUDA graphs (``mode="reduce-overhead"``): plain Inductor, ours and the hand-written IndexCache (issue 12).

Run from the repository root on one CUDA card, in one process::

    PYTHONPATH=. python benchmarks/bench_decode_cudagraphs.py --out "$OUT" --budget-s 200

The workload and the variants are ``bench_gpu_indexcache.py``'s (``Runner.build``: V3.2 per-layer dims, bf16, dense MLP
of the MoE's active FLOPs; ``compile_variant``): each compiled once with ``dynamic=True`` and ``mode="reduce-overhead"``
(ours as ``IndexCacheBackend(index_topk_freq=f, index_skip_topk_offset=1, fuse_indexer_kernel=False)``, IndexCache
alone; hand as the model's own IndexCache under plain Inductor), all alive together (one code object each). The caches
are marked static addresses (``torch._dynamo.mark_static_address``, as transformers' StaticCache does): Inductor
records CUDA graphs only for graphs whose mutated inputs are static. Timing: ``--rounds`` interleaved rounds (every
variant in turn) of ``--calls`` CUDA-event-timed replays, ``torch.compiler.cudagraph_mark_step_begin()`` before each;
a point's time is the median over rounds. ``stream_ms``: the same steps queued back to back without a sync (the
card's time per step, without the host's per-call work), median over rounds. Compilation is excluded; each variant's first call is its compile.

Derived, per point (L layers): indexer time of one layer i = (t_inductor - t_hand) / n_S(hand) from the measured
hand-written variant with the most S layers; share = L * i / t_inductor; the Amdahl ideal of a pattern with n_S
shared layers is 1 / (1 - share * n_S / L) (for that hand variant it equals its speedup by construction);
of_ideal = speedup / ideal; vs_hand = t_hand / t_ours at the same pattern.

``--prewarm``: before anything else, one worker process per variant compiles it on the first point (in parallel, on
the host's cores) into a shared Inductor cache directory; the measuring process then compiles each variant again
and hits the FX graph cache, so its compiles cost the trace, not the codegen. Without it the variants compile one
after another (120 s each at 4 layers on the H200) and a 10-minute device command fits three of them.

Variants compile in priority order (inductor, hand_f4, ours_f4, hand_f2, ours_f2, hand_f8, ours_f8); a pair starts only
if its two compiles fit the budget (the last compile time is the estimate). Writes decode_cudagraphs.{json,md},
decode_cudagraphs_log.txt and results_rows.csv (rows of the results table: ``scripts/results_tables.py --add``)
under --out, rewritten after every phase; ``--rows-from JSON`` writes the rows of an earlier run's json.
``--smoke``: the tiny config on the CPU (checks the script; CUDA graphs do not exist there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from benchmarks.prewarm import add_arguments, describe, prewarm_if_asked  # noqa: E402
from benchmarks.bench_gpu_indexcache import Runner, compile_variant, variant_freq, variant_pattern  # noqa: E402
from fx_indexcache import IndexCacheBackend  # noqa: E402

MODE = "reduce-overhead"
PRIORITY = ("inductor", "hand_f4", "ours_f4", "hand_f2", "ours_f2", "hand_f8", "ours_f8")


def shared_layers(name: str, layers: int) -> int:
    return variant_pattern(name, layers).count("S")


class CudaGraphDecode:
    def __init__(self, a) -> None:
        self.a = a
        self.runner = Runner(SimpleNamespace(out=a.out, budget_s=a.budget_s, smoke=a.smoke, layers=a.layers,
                                             run_label="cudagraphs"))
        self.runner.log_f = open(os.path.join(a.out, "decode_cudagraphs_log.txt"), "a")
        self.runner.build()
        self.points = [tuple(map(int, p.split("@"))) for p in a.points.split(",")]  # (B, T)
        if a.smoke:
            self.points = [(4, 128), (2, 256), (1, 128)]
        if a.compile_only:
            self.points = self.points[:1]
        self.caches = {}
        for B, T in self.points:
            cache = self.runner.filled_cache(B, T)
            for tensor in (*cache.kv, *cache.index_k):
                torch._dynamo.mark_static_address(tensor)
            self.caches[(B, T)] = cache
        self.fns: dict = {}
        self.compiles: dict = {}
        self.rows: list[dict] = []
        self.notes: list[str] = []

    def log(self, msg: str) -> None:
        self.runner.log(msg)

    def call(self, name: str, B: int, T: int, ids):
        fn, cache = self.fns[name], self.caches[(B, T)]

        def step():
            torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                return fn(ids, cache, T - 1)

        return step

    def ids(self, B: int, T: int):
        dev = self.runner.dev
        return torch.randint(0, self.runner.cfg.vocab_size, (B, 1), device=dev,
                             generator=torch.Generator(device=dev).manual_seed(B + T))

    def compile_one(self, name: str) -> None:
        counters = torch._dynamo.utils.counters
        skips_before = counters["inductor"].get("cudagraph_skips", 0)
        graphs_before = counters["stats"]["unique_graphs"]
        hits_before = counters["inductor"].get("fxgraph_cache_hit", 0)
        self.fns[name] = compile_variant(name, self.runner.model, self.runner.L, own_code=True, mode=MODE)
        B, T = self.points[0]
        t = time.time()
        modes = []
        real = IndexCacheBackend.resolve_mode
        with mock.patch.object(IndexCacheBackend, "resolve_mode",
                               lambda backend, m: modes.append(real(backend, m)) or modes[-1]):
            self.call(name, B, T, self.ids(B, T))()
        self.runner.sync()
        self.compiles[name] = dict(compile_s=round(time.time() - t, 1),
                                   graphs=counters["stats"]["unique_graphs"] - graphs_before,
                                   cudagraph_skips=counters["inductor"].get("cudagraph_skips", 0) - skips_before,
                                   mode_seen_by_ours=modes[0] if modes else None,
                                   fx_cache_hits=counters["inductor"].get("fxgraph_cache_hit", 0) - hits_before)
        self.log(f"{name}: first call (compile) {self.compiles[name]}")

    def compile_within_budget(self) -> None:
        wanted = self.a.variants.split(",")
        names = [n for n in PRIORITY if n in wanted] + [n for n in wanted if n not in PRIORITY]  # e.g. ours_f4_drop
        while names:
            group = names[:1] if names[0] == "inductor" else names[:2]
            names = names[len(group):]
            need = self.compile_estimate_s() * 1.1 * len(group) + 25
            if self.compiles and self.runner.left() < need:
                self.notes.append(f"skipped {', '.join(group)}: {self.runner.left():.0f}s left, needs ~{need:.0f}s")
                self.log(self.notes[-1])
                continue
            for name in group:
                self.compile_one(name)

    def compile_estimate_s(self) -> float:
        """Seconds the next compile will take: the last one, except that a process's first compile also pays for
        starting CUDA and Triton (65 s of a 67 s FX-cache hit in run 4), so it predicts nothing when the cache is warm."""
        times = [c["compile_s"] for c in self.compiles.values()]
        if len(times) == 1 and torch._inductor.config.fx_graph_cache:
            return 15.0
        return times[-1] if times else 0.0

    def measure(self) -> None:
        counters = torch._dynamo.utils.counters
        for B, T in self.points:
            if self.runner.left() < 5:
                self.notes.append(f"stopped before b{B}@{T} (budget)")
                break
            if B == 1 and not any(r["B"] == 1 for r in self.rows):  # dynamo specialises batch 1: one more compile each
                need = 0.9 * sum(c["compile_s"] for c in self.compiles.values()) + 10
                if self.runner.left() < need:
                    self.notes.append(f"skipped b1@{T}: batch 1 is a new graph per variant (~{need:.0f}s), "
                                      f"{self.runner.left():.0f}s left")
                    self.log(self.notes[-1])
                    continue
            ids = self.ids(B, T)
            steps = {n: self.call(n, B, T, ids) for n in self.fns}
            graphs_before = counters["stats"]["unique_graphs"]
            for step in steps.values():  # warm-up: a new point may record a new CUDA graph (or specialise once)
                step()
                step()
            warm_graphs = counters["stats"]["unique_graphs"] - graphs_before
            rounds = {n: [] for n in steps}
            streamed = {n: [] for n in steps}
            for _ in range(self.a.rounds):
                for n, step in steps.items():
                    ms, _, _ = self.runner.time_calls(step, target_s=0.0, max_reps=self.a.calls, min_reps=self.a.calls)
                    rounds[n].append(ms)
                    streamed[n].append(self.back_to_back_ms(step))
            recompiled = counters["stats"]["unique_graphs"] - graphs_before - warm_graphs
            outputs = {n: step().float().cpu() for n, step in steps.items()}
            point = self.runner.label("decode", B, 1, T)
            for n in steps:
                row = dict(point=point, B=B, T=T, variant=n, ms=round(statistics.median(rounds[n]), 4),
                           round_min=round(min(rounds[n]), 4), round_max=round(max(rounds[n]), 4),
                           stream_ms=round(statistics.median(streamed[n]), 4),
                           new_graphs_at_warmup=warm_graphs, recompiled_while_timed=recompiled)
                hand = f"hand_f{variant_freq(n)}" if n.startswith("ours") else None
                if hand in outputs:
                    ref = outputs[hand]
                    row["logits_rel_err_vs_hand"] = float(f"{((outputs[n] - ref).norm() / ref.norm()).item():.3g}")
                self.rows.append(row)
                self.log(f"{point:14s} {n:9s} {row['ms']:9.4f} ms (rounds {row['round_min']}-{row['round_max']})")
            self.write()

    def back_to_back_ms(self, step) -> float:
        """ms per step over ``--calls`` steps queued without a sync between them: the host runs ahead of the card,
        so this is the card's time per step, without the host's per-call work that the synced timing includes."""
        if self.runner.dev.type != "cuda":
            t = time.perf_counter()
            for _ in range(self.a.calls):
                step()
            return (time.perf_counter() - t) * 1e3 / self.a.calls
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.runner.sync()
        start.record()
        for _ in range(self.a.calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / self.a.calls

    def derived(self) -> list[dict]:
        L = self.runner.L
        out = []
        for point in dict.fromkeys(r["point"] for r in self.rows):
            rows = {r["variant"]: r for r in self.rows if r["point"] == point}
            if "inductor" not in rows:
                continue
            base = rows["inductor"]["ms"]
            hands = [n for n in rows if n.startswith("hand")]
            share = None
            if hands:
                ref = max(hands, key=lambda n: shared_layers(n, L))
                share = L * (base - rows[ref]["ms"]) / shared_layers(ref, L) / base
            for n, r in rows.items():
                d = dict(r, speedup=round(base / r["ms"], 3), indexer_share=None if share is None else round(share, 3),
                         pattern=variant_pattern(n, L))
                if share is not None and n != "inductor":
                    ideal = 1 / (1 - share * shared_layers(n, L) / L)
                    d.update(ideal=round(ideal, 3), of_ideal=round(d["speedup"] / ideal, 3))
                hand = f"hand_f{variant_freq(n)}" if n.startswith("ours") else None
                if hand in rows:
                    d["vs_hand"] = round(rows[hand]["ms"] / r["ms"], 3)
                    d["vs_hand_stream"] = round(rows[hand]["stream_ms"] / r["stream_ms"], 3)
                out.append(d)
        return out

    def write(self) -> None:
        a = self.a
        derived = self.derived()
        with open(os.path.join(a.out, "decode_cudagraphs.json"), "w") as f:
            json.dump(dict(env=self.runner.env, mode=MODE, compiles=self.compiles, notes=self.notes, rows=derived,
                           rounds=a.rounds, calls=a.calls), f, indent=1)
        cols = ["point", "variant", "pattern", "ms", "round_min", "round_max", "speedup", "indexer_share", "ideal",
                "of_ideal", "vs_hand", "stream_ms", "vs_hand_stream", "logits_rel_err_vs_hand", "recompiled_while_timed"]
        lines = [f"# Decode under CUDA graphs (mode={MODE!r})", "",
                 "Environment: " + ", ".join(f"{k}={v}" for k, v in self.runner.env.items()), "",
                 f"{a.rounds} interleaved rounds of {a.calls} event-timed CUDA-graph replays; ms = median over rounds.",
                 "Compiles: " + "; ".join(f"{n} {c}" for n, c in self.compiles.items()), ""]
        lines += [f"- {note}" for note in self.notes]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in derived]
        with open(os.path.join(a.out, "decode_cudagraphs.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        write_rows(Path(a.out) / "results_rows.csv", self.runner.env, derived)


def write_rows(path: Path, env: dict, derived: list[dict]) -> int:
    """The run's figures as rows of the results table (``scripts/results_tables.py --add path``): per point and
    variant its median ms, its speedup over Inductor and, for ours, its ratio to the hand-written IndexCache (graph
    replays timed one by one, and streamed back to back)."""
    from benchmarks.bench_environment import write_result_rows

    machine = dict(device=env["card"], driver=env.get("driver"), torch=env["torch"], triton=env.get("triton", "?"),
                   date=env["date"], commit=env.get("commit") or os.environ.get("BENCH_COMMIT", ""))
    values = [(r["point"], r["variant"], metric, r.get(key), unit) for r in derived
              for metric, key, unit in (("ms", "ms", "ms"), ("speedup_vs_inductor", "speedup", "x"),
                                        ("vs_hand", "vs_hand", "x"), ("vs_hand_streamed", "vs_hand_stream", "x"))]
    return write_result_rows(path, f"decode_cudagraphs_{env['layers']}_layers", machine,
                             "benchmarks/bench_decode_cudagraphs.py", values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"), required="OUT" not in os.environ,
                    help="folder for this run's files (default $OUT); nothing is written into the checkout unasked")
    ap.add_argument("--budget-s", type=float, default=200.0, help="compiles stop being started after this")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--points", default="16@8192,64@8192,16@32768,64@32768,16@131072,1@32768,1@131072",
                    help="comma list of batch@context")
    ap.add_argument("--variants", default=",".join(PRIORITY))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rows-from", metavar="JSON",
                    help="write --out/results_rows.csv from an earlier run's decode_cudagraphs.json and stop")
    add_arguments(ap)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.rows_from:
        with open(a.rows_from) as f:
            run = json.load(f)
        print(write_rows(Path(a.out) / "results_rows.csv", run["env"], run["rows"]), "rows")
        return
    torch._dynamo.config.cache_size_limit = 64
    args = ["--layers", str(a.layers), "--points", a.points, "--budget-s", "1e9", "--out",
            os.path.join(a.out, "prewarm")] + (["--smoke"] if a.smoke else [])
    warmed = prewarm_if_asked(a, __file__, a.variants.split(","), args)
    if a.prewarm_only:
        return
    bench = CudaGraphDecode(a)
    if warmed is not None:
        bench.notes.append(describe(warmed))
        bench.log(bench.notes[-1])
    if a.compile_only:
        bench.compile_one(a.variants)
        return
    bench.compile_within_budget()
    bench.write()
    bench.measure()
    bench.write()
    print(open(os.path.join(a.out, "decode_cudagraphs.md")).read())


if __name__ == "__main__":
    main()
