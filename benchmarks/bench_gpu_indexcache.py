"""End-to-end GPU benchmark of IndexCache on a few-layer stack of real DeepSeek-V3.2 layers (issue 5).

Run from the repository root on one CUDA card, in one process::

    PYTHONPATH=. python benchmarks/bench_gpu_indexcache.py --out "$OUT" --budget-s 480

Model: ``DSAModelConfig.deepseek_v32(num_layers=L, moe=False)`` (default L=6): real V3.2 per-layer dims
(MLA, indexer 64x128 heads, top-k 2048) with a dense MLP of the MoE's active FLOPs, bf16, real vocab;
prefill computes only the last position's logits (``logits_to_keep=1``, as a serving prefill does).

Variants (each compiled once with ``dynamic=True``, ``torch._dynamo.reset()`` between variants):
  eager            the model as written, all layers F
  inductor         ``torch.compile(backend="inductor")``, all layers F (the baseline of every speedup)
  ours_f{2,4,8}    ``indexcache_backend`` with ``index_topk_freq=f, index_skip_topk_offset=1``: layer i is F
                   iff i % f == 0, so over L=6 layers f2 = FSFSFS, f4 = FSSSFS, f8 = FSSSSS (all three distinct)
                   (offset 1 instead of the default 2, so that a few layers show the periodic pattern)
  fused_f4         ours_f4 with ``fuse_indexer_kernel=True`` (the backend's default since commit 5ff6ec7: the F layers'
                   scoring runs as the fused Triton kernel); ours_* set it False to measure IndexCache alone
  hand_f{2,4,8}    the hand-written model-level IndexCache (``set_index_cache_pattern`` with the executed
                   pattern of the same config), compiled with plain Inductor

Points: prefill of a chunk of S tokens at the end of a context of T tokens (the KV and indexer-key
caches hold T - S random rows; ``start_pos = T - S``): 1Kx8K, 1Kx32K, 2Kx32K, 1Kx64K (4Kx64K would need
~130 GB for the [S, 64, T] fp32 indexer logits: not run). Decode: one token per sequence at batch
16, 64 (one dynamic graph) and 1 (batch 1 is specialised by dynamo: a second graph) against a 32K
context. Filling the caches is not timed (random rows: the timing does not depend on their values).

Times are medians over CUDA-event-timed calls after warm-up calls (compilation excluded).
Indexer share (of the stack's time, per point): i = (t_inductor - t_hand_f8) / (L - 1) is the time of
one layer's indexer (hand_f8 runs every layer but the first without it), share = L * i / t_inductor.
Amdahl ideal for a pattern with n_S shared layers: 1 / (1 - share * n_S / L); for f8 it equals
hand_f8's speedup by construction, for f2 and f4 it is a prediction.
The generated code of every compiled variant is captured (GraphLowering.save_output_code) and its
``aten.topk.default(`` calls counted: it must equal the number of F layers (for fused_* the F layers' top-k may run
inside the fused custom op instead, so its count can be lower: read it with the pass report's pattern).

Writes under --out: gpu_indexcache.csv, gpu_indexcache.md, gpu_indexcache.json, gpu_indexcache.png,
gpu_indexcache_log.txt; the CSV/MD/JSON are rewritten after every point, so a run cut short keeps
what it measured. Work that would not fit the time budget is skipped (and said so).

Runs 1-2 (H100, torch 2.11) compiled prefill first at 1Kx8K and recompiled at the first 1Kx32K and 2Kx32K calls
(30-65 s each); the third graph served 1Kx64K. Most likely cause (not yet confirmed by a recompile log): Inductor's
32-bit indexing guards -- the [S, 64, T] logits reach 2^31 elements at 1Kx32K and the gathered [S, 2048, 576] latents
pass it at 2Kx32K. The prefill points are therefore now run largest first (2Kx32K), so that the first graph indexes
with int64 everywhere; check the "new graphs" column of the log.

``--smoke`` runs the same code on the CPU with the tiny config (a check of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from unittest import mock

import torch
import torch.fx.experimental._config as fx_config

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from fx_indexcache import IndexCacheConfig, clear_reports, indexcache_backend, reports  # noqa: E402
from fx_indexcache.reference import DSAModelConfig, ReferenceDSAModel  # noqa: E402

FREQS = (2, 4, 8)
OFFSET = 1
# Priority order: the baseline, then hand_f8 (needed for the indexer share), then the rest.
VARIANTS = ["inductor", "hand_f8", "ours_f4", "hand_f4", "ours_f8", "ours_f2", "hand_f2", "eager", "fused_f4"]


def executed_pattern(freq: int, n: int) -> str:
    return IndexCacheConfig(use_index_cache=True, index_topk_freq=freq, index_skip_topk_offset=OFFSET).executed_pattern(n)


def variant_pattern(name: str, n: int) -> str:
    if name in ("eager", "inductor"):
        return "F" * n
    return executed_pattern(int(name.split("_f")[1]), n)


class Runner:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget_s
        os.makedirs(args.out, exist_ok=True)
        self.log_f = open(os.path.join(args.out, "gpu_indexcache_log.txt"), "a")
        self.rows: list[dict] = []
        self.compiles: list[dict] = []
        self.notes: list[str] = []
        self.outputs: dict = {}
        self.max_compile_s = 60.0 if not args.smoke else 30.0
        self.dev = torch.device("cpu" if args.smoke else "cuda")

    # ------------------------------------------------------------------ utils
    def log(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log_f.write(line + "\n")
        self.log_f.flush()

    def left(self) -> float:
        return self.deadline - time.time()

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def time_calls(self, fn, target_s: float = 1.2, max_reps: int = 25, min_reps: int = 3) -> tuple[float, int, float]:
        """(median ms, reps, first warm-up ms). Two warm-up calls (the first may compile), then events."""
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        first = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        fn()
        self.sync()
        est = max((time.perf_counter() - t) * 1e3, 1e-3)
        reps = int(max(min_reps, min(max_reps, target_s * 1e3 / est)))
        times = []
        for _ in range(reps):
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), reps, first

    # ------------------------------------------------------------------ setup
    def build(self):
        a = self.args
        if a.smoke:
            self.cfg = DSAModelConfig.tiny(num_layers=a.layers, first_k_dense_layers=min(3, a.layers),
                                           dense_mlp_instead_of_moe=True, max_seq_len=4096)
            dtype = torch.float32
            self.prefill_points = [(16, 64), (16, 128), (32, 128), (16, 256)]
            self.decode_points = [(2, 128), (4, 128), (1, 128)]
        else:
            self.cfg = DSAModelConfig.deepseek_v32(num_layers=a.layers, moe=False, max_seq_len=65536)
            dtype = torch.bfloat16
            # Largest first: Inductor indexes with int32 where a buffer's numel fits and guards on it, so a graph first
            # compiled at 1Kx8K recompiles when [S,64,T] passes 2^31 elements (1Kx32K) and again when the gathered
            # [S,2048,576] latents do (2Kx32K) -- what runs 1-2 did. Compiled first at 2Kx32K it is int64 throughout.
            self.prefill_points = [(2048, 32768), (1024, 65536), (1024, 32768), (1024, 8192)]
            self.decode_points = [(16, 32768), (64, 32768), (1, 32768)]
        self.L = self.cfg.num_layers
        t = time.time()
        self.model = ReferenceDSAModel(self.cfg, seed=0, dtype=dtype, device=self.dev)
        self.dtype = dtype
        self.log(f"model built in {time.time() - t:.1f}s: {self.L} layers, "
                 f"{sum(p.numel() for p in self.model.parameters()) / 1e9:.2f} B params")
        self.env = dict(
            card=torch.cuda.get_device_name(0) if self.dev.type == "cuda" else platform.processor() or "cpu",
            torch=torch.__version__,
            cuda=torch.version.cuda,
            python=platform.python_version(),
            date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            layers=self.L,
            model="DSAModelConfig.deepseek_v32(num_layers=%d, moe=False), bf16" % self.L if not a.smoke else "tiny (smoke)",
            offset=OFFSET,
        )
        try:
            import triton

            self.env["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            self.env["triton"] = "n/a"
        if self.dev.type == "cuda":
            p = torch.cuda.get_device_properties(0)
            self.env["sms"] = p.multi_processor_count
            self.env["mem_gib"] = round(p.total_memory / 2**30, 1)
        self.log(f"env: {self.env}")
        for f in FREQS:
            self.log(f"freq {f} offset {OFFSET}: executed pattern {executed_pattern(f, self.L)}")

    def filled_cache(self, B: int, T: int):
        cache = self.model.new_cache(B, max_seq_len=T)
        g = torch.Generator(device=self.dev).manual_seed(B * 7 + T)
        for t in (*cache.kv, *cache.index_k):
            t.copy_(torch.randn(t.shape, generator=g, device=self.dev, dtype=torch.float32).to(t.dtype))
        return cache

    def fits(self, S: int, T: int, B: int = 1) -> bool:
        if self.dev.type != "cuda":
            return True
        free, total = torch.cuda.mem_get_info()
        need = 2.2 * B * S * self.cfg.index_n_heads * T * 4  # fp32 logits + relu(logits), plus slack
        return need < free * 0.92

    # ------------------------------------------------------------------ variants
    def make(self, name: str):
        """The callable for a variant: ``fn(ids, cache, start_pos)``.

        Compiled variants get ``start_pos`` as the length of a small CPU tensor: a plain int argument is
        specialised by dynamo on the first call (run 1 recompiled at every prefill point because of it),
        a tensor dimension is symbolic from the first compile under ``dynamic=True``.
        """
        torch._dynamo.reset()
        clear_reports()
        if name == "eager":
            model = self.model
            return lambda ids, cache, start: model(ids, cache, start, logits_to_keep=1)
        if name.startswith("hand"):
            model = copy.copy(self.model)  # shares the parameters, has its own pattern attribute
            model.set_index_cache_pattern(executed_pattern(int(name.split("_f")[1]), self.L))
        else:
            model = self.model

        def step(ids, cache, start_len):
            return model(ids, cache, start_len.shape[0], logits_to_keep=1)

        if name.startswith(("ours", "fused")):
            f = int(name.split("_f")[1])
            # ours_*: IndexCache alone (the F layers keep Inductor's indexer code, like the baselines);
            # fused_*: the backend's default since 5ff6ec7, F layers' scoring as the fused Triton kernel.
            compiled = torch.compile(step, backend=indexcache_backend, dynamic=True,
                                     options={"index_topk_freq": f, "index_skip_topk_offset": OFFSET,
                                              "fuse_indexer_kernel": name.startswith("fused")})
        else:
            compiled = torch.compile(step, backend="inductor", dynamic=True)
        return lambda ids, cache, start: compiled(ids, cache, torch.empty(start, dtype=torch.uint8))

    def first_call_with_code(self, name, phase, fn):
        """Run fn (which compiles) capturing Inductor's output code; record compile time and top-k count."""
        from torch._inductor.graph import GraphLowering

        codes: list[str] = []
        self.sync()
        t = time.time()
        with mock.patch.object(GraphLowering, "save_output_code", lambda code: codes.append(code)):
            fn()
        self.sync()
        dt = time.time() - t
        if name != "eager":
            self.max_compile_s = 1.1 * dt  # the next compile costs about the same (kernels are cached by then)
        n_topk = sum(len(re.findall(r"aten\.topk\.default\(", c)) for c in codes)
        rep = [r for r in reports() if r.decisions]
        pattern = variant_pattern(name, self.L)
        rec = dict(variant=name, phase=phase, first_call_s=round(dt, 1), graphs=len(codes), topk_calls=n_topk if codes else None,
                   f_layers=pattern.count("F"), pattern=pattern,
                   pass_pattern=rep[-1].pattern if rep else "", indexers_removed=rep[-1].indexers_removed if rep else None)
        if name != "eager":
            rec["topk_ok"] = (n_topk == pattern.count("F")) if codes else None
            self.compiles.append(rec)
        self.log(f"{name} {phase}: first call (compile) {dt:.1f}s, {len(codes)} graph(s), aten.topk calls {n_topk} "
                 f"(F layers {pattern.count('F')}), pass pattern {rec['pass_pattern'] or '-'}")
        return rec

    # ------------------------------------------------------------------ measuring
    def measure(self, name, phase, model, B, S, T, cache, first: bool):
        ids = torch.randint(0, self.cfg.vocab_size, (B, S), device=self.dev,
                            generator=torch.Generator(device=self.dev).manual_seed(S + T + B))
        start = T - S

        def fn():
            with torch.no_grad():
                return model(ids, cache, start)

        row = dict(variant=name, phase=phase, B=B, S=S, T=T, point=self.label(phase, B, S, T))
        try:
            if first:
                self.first_call_with_code(name, phase, fn)
            if self.dev.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            ms, reps, warm_ms = self.time_calls(fn)
            row["recompiled"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
            out = fn().float().cpu()
            self.outputs[(name, row["point"])] = out
            row.update(ms=round(ms, 4), reps=reps, warmup_first_ms=round(warm_ms, 2))
            if self.dev.type == "cuda":
                peak = torch.cuda.max_memory_allocated()
                row.update(peak_gib=round(peak / 2**30, 2), act_peak_gib=round((peak - base) / 2**30, 2))
            self.log(f"{name:9s} {row['point']:16s} {ms:9.3f} ms  (reps {reps}, first warm-up {warm_ms:.1f} ms, "
                     f"new graphs {row['recompiled']})"
                     f"  peak {row.get('peak_gib', '-')} GiB (activations {row.get('act_peak_gib', '-')})")
        except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
            row.update(ms=None, error="OOM")
            self.log(f"{name} {row['point']}: OOM {str(e)[:200]}")
        except Exception as e:  # noqa: BLE001
            row.update(ms=None, error=f"{type(e).__name__}: {str(e)[:200]}")
            self.log(f"{name} {row['point']}: FAILED {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        self.rows.append(row)
        self.write()
        return row

    @staticmethod
    def label(phase, B, S, T):
        k = lambda n: f"{n // 1024}K" if n >= 1024 else str(n)  # noqa: E731
        return f"prefill {k(S)}x{k(T)}" if phase == "prefill" else f"decode b{B}@{k(T)}"

    def run_phase(self, phase: str, points: list[tuple[int, int, int]], caches, until: float):
        """points: (B, S, T). One compile per variant (first point), then every point.

        A variant starts only if its compile and points fit before ``until`` (seconds from the start)."""
        for name in VARIANTS:
            need = (0 if name == "eager" else self.max_compile_s) + 5 * len(points)
            if min(self.left(), self.t0 + until - time.time()) < need:
                self.notes.append(f"{phase}: skipped {name} (budget: {self.left():.0f}s left, needs ~{need:.0f}s)")
                self.log(self.notes[-1])
                continue
            model = self.make(name)
            first = True
            for (B, S, T) in points:
                if self.left() < 8:
                    self.notes.append(f"{phase}: {name} stopped before {self.label(phase, B, S, T)} (budget)")
                    self.log(self.notes[-1])
                    break
                r = self.measure(name, phase, model, B, S, T, caches[(B, T)], first)
                first = False
            del model
            torch._dynamo.reset()
            gc.collect()
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ derived numbers
    def derived(self) -> list[dict]:
        by = {(r["variant"], r["point"]): r for r in self.rows if r.get("ms")}
        points = []
        for r in self.rows:
            if r["point"] not in points:
                points.append(r["point"])
        out = []
        for p in points:
            base = by.get(("inductor", p))
            h8 = by.get(("hand_f8", p))
            share = None
            if base and h8:
                i = (base["ms"] - h8["ms"]) / (self.L - 1)
                share = self.L * i / base["ms"]
            for name in VARIANTS:
                r = by.get((name, p))
                if not r:
                    continue
                pat = variant_pattern(name, self.L)
                n_s = pat.count("S")
                d = dict(point=p, variant=name, pattern=pat, ms=r["ms"], peak_gib=r.get("peak_gib"),
                         act_peak_gib=r.get("act_peak_gib"))
                d["speedup_vs_inductor"] = round(base["ms"] / r["ms"], 3) if base else None
                d["indexer_share"] = round(share, 3) if share is not None else None
                if share is not None:
                    ideal = 1.0 / (1.0 - share * n_s / self.L)
                    d["amdahl_ideal"] = round(ideal, 3)
                    d["frac_of_ideal"] = round(d["speedup_vs_inductor"] / ideal, 3) if d["speedup_vs_inductor"] else None
                if name.startswith(("ours", "fused")):
                    h = by.get(("hand_" + name.split("_")[1], p))
                    d["ours_vs_hand"] = round(h["ms"] / r["ms"], 3) if h else None
                    ref = self.outputs.get(("hand_" + name.split("_")[1], p))
                    got = self.outputs.get((name, p))
                    if ref is not None and got is not None:
                        d["logits_rel_err_vs_hand"] = float(f"{((got - ref).norm() / ref.norm().clamp_min(1e-30)).item():.3g}")
                out.append(d)
        return out

    def write(self):
        a = self.args
        derived = self.derived()
        with open(os.path.join(a.out, "gpu_indexcache.json"), "w") as f:
            json.dump(dict(env=self.env, raw=self.rows, derived=derived, compiles=self.compiles, notes=self.notes), f, indent=1)
        cols = ["point", "variant", "pattern", "ms", "speedup_vs_inductor", "indexer_share", "amdahl_ideal",
                "frac_of_ideal", "ours_vs_hand", "logits_rel_err_vs_hand", "peak_gib", "act_peak_gib"]
        with open(os.path.join(a.out, "gpu_indexcache.csv"), "w", newline="") as f:
            f.write("# " + ", ".join(f"{k}={v}" for k, v in self.env.items()) + "\n")
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for d in derived:
                w.writerow(d)
        lines = [
            "# IndexCache end-to-end GPU benchmark",
            "",
            "Environment: " + ", ".join(f"{k}={v}" for k, v in self.env.items()),
            "",
            f"Stack of {self.L} layers; freq f with index_skip_topk_offset={OFFSET}: "
            + ", ".join(f"f{f} = {executed_pattern(f, self.L)}" for f in FREQS)
            + ". Median ms; speedup over plain Inductor (all F); indexer share of the stack's time from "
            "inductor vs hand_f8; Amdahl ideal = 1/(1 - share * n_S/L) (for f8 it equals hand_f8 by construction).",
            "",
            "| point | variant | pattern | ms | speedup | indexer share | ideal | of ideal | ours/hand | logits rel err vs hand | peak GiB | activation peak GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        for d in derived:
            lines.append("| " + " | ".join(fmt(d.get(c)) for c in cols) + " |")
        lines += ["", "## Compiles and generated code (aten.topk calls must equal F layers)", "",
                  "| variant | phase | first call s | graphs | aten.topk in code | F layers | ok | pass pattern | indexers removed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in self.compiles:
            lines.append(f"| {c['variant']} | {c['phase']} | {c['first_call_s']} | {c['graphs']} | {c['topk_calls']} | "
                         f"{c['f_layers']} | {c.get('topk_ok')} | {c['pass_pattern']} | {c['indexers_removed']} |")
        errs = [r for r in self.rows if r.get("error")]
        if errs or self.notes:
            lines += ["", "## Skipped / failed", ""]
            lines += [f"- {r['variant']} {r['point']}: {r['error']}" for r in errs]
            lines += [f"- {n}" for n in self.notes]
        with open(os.path.join(a.out, "gpu_indexcache.md"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def plot(self):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception as e:  # noqa: BLE001
            self.log(f"no plot: {e}")
            return
        derived = self.derived()
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, phase in zip(axes, ("prefill", "decode")):
            pts = []
            for d in derived:
                if d["point"].startswith(phase) and d["point"] not in pts:
                    pts.append(d["point"])
            if not pts:
                ax.set_visible(False)
                continue
            order = {r["point"]: (r["T"], r["S"], r["B"]) for r in self.rows}
            pts.sort(key=lambda p: order.get(p, (0, 0, 0)))
            x = list(range(len(pts)))
            colors = {2: "tab:blue", 4: "tab:orange", 8: "tab:green"}
            for f in FREQS:
                for kind, style in (("ours", "o-"), ("hand", "s--")):
                    ys = [next((d["speedup_vs_inductor"] for d in derived if d["point"] == p and d["variant"] == f"{kind}_f{f}"), math.nan) for p in pts]
                    ax.plot(x, ys, style, color=colors[f], label=f"{kind} f{f}", alpha=0.9 if kind == "ours" else 0.6)
                ideal = [next((d.get("amdahl_ideal", math.nan) for d in derived if d["point"] == p and d["variant"] == f"ours_f{f}"), math.nan) for p in pts]
                ax.plot(x, ideal, ":", color=colors[f], lw=2, label=f"Amdahl ideal f{f}")
            ys = [next((d["speedup_vs_inductor"] for d in derived if d["point"] == p and d["variant"] == "eager"), math.nan) for p in pts]
            ax.plot(x, ys, "x-", color="gray", label="eager")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(x)
            ax.set_xticklabels([p.split(" ", 1)[1] for p in pts])
            ax.set_title(f"{phase} ({self.L} V3.2 layers)")
            ax.set_xlabel("chunk x context" if phase == "prefill" else "batch @ context")
            ax.set_ylabel("speedup over plain Inductor (all F)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.suptitle(f"IndexCache: {self.env['card']}, torch {self.env['torch']}, Triton {self.env['triton']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(self.args.out, "gpu_indexcache.png"), dpi=110)
        self.log("plot written")

    # ------------------------------------------------------------------ main
    def main(self):
        torch._dynamo.config.cache_size_limit = 64
        try:
            torch._dynamo.config.accumulated_cache_size_limit = 256
        except Exception:  # noqa: BLE001
            pass
        fx_config.use_duck_shape = False  # no equal-value symbol merging between points
        torch._inductor.config.fx_graph_cache = False  # so every compile's code is generated (and captured)
        torch.backends.cuda.matmul.allow_tf32 = False
        self.build()
        # prefill caches: B=1, capacity T, all allocated up front (small: ~0.1 GB per layer at 64K)
        pre = [(1, S, T) for (S, T) in self.prefill_points]
        pre_fit = [p for p in pre if self.fits(p[1], p[2])]
        for p in pre:
            if p not in pre_fit:
                self.notes.append(f"prefill {p[1]}x{p[2]}: skipped, its [S, 64, T] fp32 indexer logits do not fit")
                self.log(self.notes[-1])
        caches = {}
        for (_, S, T) in pre_fit:
            if (1, T) not in caches:
                caches[(1, T)] = self.filled_cache(1, T)
        prefill_until = (0.62 if "decode" in self.args.phases else 1.0) * self.args.budget_s
        if "prefill" in self.args.phases:
            self.run_phase("prefill", pre_fit, caches, until=prefill_until)
        del caches
        gc.collect()
        self.plot()
        dec_main = [(B, 1, T) for (B, T) in self.decode_points if B != 1]
        dec_one = [(B, 1, T) for (B, T) in self.decode_points if B == 1]
        for pts, until in ((dec_main, 0.9 * self.args.budget_s), (dec_one, self.args.budget_s)):
            if "decode" not in self.args.phases:
                break
            if not pts or self.left() < 30:
                if pts:
                    self.notes.append(f"decode {pts}: skipped (budget)")
                continue
            caches = {(B, T): self.filled_cache(B, T) for (B, _, T) in pts}
            self.run_phase("decode", pts, caches, until=until)
            del caches
            gc.collect()
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
        self.write()
        self.plot()
        self.log(f"done in {time.time() - self.t0:.0f}s")
        # short table last (the reply carries the end of the output)
        for d in self.derived():
            print(f"{d['point']:18s} {d['variant']:9s} {d['ms']:9.3f} ms  x{d.get('speedup_vs_inductor')}  "
                  f"share {d.get('indexer_share')} ideal {d.get('amdahl_ideal')} of-ideal {d.get('frac_of_ideal')} "
                  f"vs-hand {d.get('ours_vs_hand')} peak {d.get('peak_gib')}")
        for c in self.compiles:
            print(f"compile {c['variant']:9s} {c['phase']:8s} {c['first_call_s']:6.1f}s topk {c['topk_calls']} F {c['f_layers']} ok {c.get('topk_ok')}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny config: checks the script only")
    ap.add_argument("--variants", default=None, help="comma list (default: all)")
    ap.add_argument("--phases", default="prefill,decode", help="comma list of prefill, decode")
    args = ap.parse_args()
    if args.variants:
        VARIANTS[:] = [v for v in VARIANTS if v in args.variants.split(",")]
    Runner(args).main()


if __name__ == "__main__":
    main()
