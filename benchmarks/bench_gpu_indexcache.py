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
caches hold T - S random rows; ``start_pos = T - S``): 4Kx16K, 1Kx128K, 1Kx64K, 2Kx32K, 1Kx32K, 1Kx8K
(a point whose [S, 64, T] fp32 indexer logits do not fit is skipped: 4Kx64K would need 64 GiB for them alone;
eager also materialises their ReLU, so it is skipped where twice that does not fit).
Decode (phase ``decode``): one token per sequence at batch 16 and 64 against 8K, 32K and 64K contexts (one dynamic
graph); phase ``decode1``: batch 1 at 32K and 128K (dynamo specialises a size-1 batch: a second graph per variant,
so it is a phase of its own that can be given fewer variants). Filling the caches is not timed (random rows: the
timing does not depend on their values).

Times are medians over at least 5 CUDA-event-timed calls after two warm-up calls (compilation excluded).
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

One device command may run for 10 minutes, less than all variants and phases need, so a measurement can be split
over several runs on the same card: each run labels its rows (``--run-label``) and ``--merge earlier.json`` folds an
earlier run's rows in (refused if the card or the torch version differs). Every ratio is taken against the
baseline of the row's own run; where a run did not measure the point's Inductor baseline (or hand_f8, for the indexer
share), it comes from another run of the same point, and the table says which run each number comes from.

Runs 1-2 (H100, torch 2.11) compiled prefill first at 1Kx8K and recompiled at the first 1Kx32K and 2Kx32K calls
(30-65 s each); the third graph served 1Kx64K. Most likely cause: Inductor's 32-bit indexing guards -- the [S, 64, T]
logits reach 2^31 elements at 1Kx32K and the gathered [S, 2048, 576] latents pass it at 2Kx32K. The first prefill
point is therefore one where both pass 2^31 (4Kx16K), so that the first graph indexes with int64 everywhere; the
"new graphs" column of the log shows whether a point recompiled.

``--phases ''`` with ``--merge`` measures nothing and writes the combined tables and plot of earlier runs (no GPU
needed). ``--smoke`` runs the same code on the CPU with the tiny config (a check of the script, not a benchmark).
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

from fx_indexcache import IndexCacheBackend, IndexCacheConfig, clear_reports, indexcache_backend, reports  # noqa: E402
from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel  # noqa: E402

FREQS = (2, 4, 8)
OFFSET = 1
# Priority order: the baseline, then hand_f8 (needed for the indexer share), then the rest.
ALL_VARIANTS = ("inductor", "hand_f8", "ours_f4", "hand_f4", "ours_f8", "ours_f2", "hand_f2", "eager", "fused_f4")
PHASES = ("prefill", "decode", "decode1")


def executed_pattern(freq: int, n: int) -> str:
    return IndexCacheConfig(use_index_cache=True, index_topk_freq=freq, index_skip_topk_offset=OFFSET).executed_pattern(n)


def variant_freq(name: str) -> int:
    """``index_topk_freq`` of a variant name (``ours_f4`` -> 4, ``ours_f8_drop`` -> 8)."""
    return int(re.search(r"_f(\d+)", name).group(1))


def hand_of(name: str) -> str:
    """The hand-written variant with the same pattern as an ours/fused one."""
    return f"hand_f{variant_freq(name)}"


def variant_pattern(name: str, n: int) -> str:
    if name in ("eager", "inductor"):
        return "F" * n
    return executed_pattern(variant_freq(name), n)


def compile_variant(name: str, model: ReferenceDSAModel, layers: int, *, own_code: bool = False, mode: str | None = None):
    """The compiled callable ``fn(ids, cache, start_pos)`` of a variant other than eager.

    ``start_pos`` reaches the compiled function as the length of a small CPU tensor: a plain int argument is
    specialised by dynamo on the first call (run 1 recompiled at every prefill point because of it), a tensor
    dimension is symbolic from the first compile under ``dynamic=True``. ``ours_*`` measures IndexCache alone
    (``fuse_indexer_kernel=False``: the F layers keep Inductor's indexer code, like the baselines); ``fused_*`` is the
    backend's CUDA default; a ``_drop`` suffix adds ``drop_shared_indexer_cache_writes=True``, ``_keep`` False (without
    either, the default: dropped where the graph holds the whole model, as here). ``own_code`` gives the
    variant a code object of its own, so that several variants stay compiled side by side (dynamo keeps compiled code
    on the code object) without their guards being tried in turn. ``mode`` is torch.compile's (ours then runs as
    ``IndexCacheBackend``, which takes a mode); with a mode the start length is a tensor on the model's device (a CPU
    input would make Inductor skip CUDA graphs), one per start value, made once.
    """
    if name.startswith("hand"):
        model = copy.copy(model)  # shares the parameters, has its own pattern attribute
        model.set_index_cache_pattern(variant_pattern(name, layers))

    def step(ids, cache, start_len):
        return model(ids, cache, start_len.shape[0], logits_to_keep=1)

    if own_code:
        step.__code__ = step.__code__.replace(co_name=f"step_{name}")
    if name.startswith(("ours", "fused")):
        options = {"index_topk_freq": variant_freq(name), "index_skip_topk_offset": OFFSET,
                   "fuse_indexer_kernel": name.startswith("fused")}
        if name.endswith(("_drop", "_keep")):
            options["drop_shared_indexer_cache_writes"] = name.endswith("_drop")
        if mode is None:
            compiled = torch.compile(step, backend=indexcache_backend, dynamic=True, options=options)
        else:
            compiled = torch.compile(step, backend=IndexCacheBackend(**options), dynamic=True, mode=mode)
    else:
        compiled = torch.compile(step, backend="inductor", dynamic=True, mode=mode)
    device = model.lm_head.weight.device if mode is not None else torch.device("cpu")
    starts: dict[int, torch.Tensor] = {}

    def call(ids, cache, start):
        if start not in starts:
            starts[start] = torch.empty(start, dtype=torch.uint8, device=device)
        return compiled(ids, cache, starts[start])

    return call


class Runner:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget_s
        os.makedirs(args.out, exist_ok=True)
        self.log_f = open(os.path.join(args.out, "gpu_indexcache_log.txt"), "a")
        self.rows: list[dict] = []  # this run's
        self.merged_rows: list[dict] = []  # earlier runs' (--merge)
        self.merged_env: list[dict] = []
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

    def time_calls(self, fn, target_s: float = 1.2, max_reps: int = 25, min_reps: int = 5) -> tuple[float, int, float]:
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
            self.prefill_points = [(64, 128), (16, 512), (16, 256), (32, 128), (16, 128), (16, 64)]
            self.decode_points = [(4, 128), (2, 256), (2, 128), (4, 64), (2, 64)]
            self.decode1_points = [(1, 512), (1, 128)]
        else:
            self.cfg = DSAModelConfig.deepseek_v32(num_layers=a.layers, moe=False, max_seq_len=131072)
            dtype = torch.bfloat16
            # First point past 2^31 elements in both [S,64,T] logits and gathered [S,2048,576] latents: Inductor indexes
            # with int32 where a buffer's numel fits and guards on it, so a graph first compiled at 1Kx8K recompiled at
            # 1Kx32K and again at 2Kx32K in runs 1-2. Compiled first at 4Kx16K it is int64 throughout.
            self.prefill_points = [(4096, 16384), (1024, 131072), (1024, 65536), (2048, 32768), (1024, 32768), (1024, 8192)]
            # decode caches of every point are allocated together (about 36 GiB for these five)
            self.decode_points = [(64, 32768), (16, 65536), (16, 32768), (64, 8192), (16, 8192)]
            self.decode1_points = [(1, 131072), (1, 32768)]
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

    def filled_caches(self, points: list[tuple[int, int, int]]) -> dict:
        caches = {}
        for (B, _, T) in points:
            if (B, T) not in caches:
                caches[(B, T)] = self.filled_cache(B, T)
        return caches

    def fits(self, S: int, T: int, B: int = 1, variant: str = "inductor") -> bool:
        """Whether the [B*S, 64, T] fp32 indexer logits fit: once for compiled code (Inductor fuses the ReLU and
        the weighted head sum into one reduction), twice for eager (logits and their ReLU), plus slack."""
        if self.dev.type != "cuda":
            return True
        free, total = torch.cuda.mem_get_info()
        copies = 2.2 if variant == "eager" else 1.3
        need = copies * B * S * self.cfg.index_n_heads * T * 4
        return need < free * 0.92

    # ------------------------------------------------------------------ variants
    def make(self, name: str):
        """The callable for a variant: ``fn(ids, cache, start_pos)``, after a dynamo reset."""
        torch._dynamo.reset()
        clear_reports()
        if name == "eager":
            model = self.model
            return lambda ids, cache, start: model(ids, cache, start, logits_to_keep=1)
        return compile_variant(name, self.model, self.L)

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
        rec = dict(run=self.args.run_label, variant=name, phase=phase, first_call_s=round(dt, 1), graphs=len(codes), topk_calls=n_topk if codes else None,
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

        row = dict(variant=name, phase=phase, B=B, S=S, T=T, point=self.label(phase, B, S, T), run=self.args.run_label)
        if self.dev.type == "cuda":  # blocks the last point left in the allocator's cache are free for this one
            gc.collect()
            torch.cuda.empty_cache()
        if not self.fits(S, T, B, variant=name):
            row.update(ms=None, error="skipped: its indexer logits would not fit in memory")
            self.log(f"{name} {row['point']}: {row['error']}")
            self.rows.append(row)
            self.write()
            return row
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
            self.outputs[(name, row["point"])] = fn().float().cpu()
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
        self.compare_with_hand(row["point"])
        self.write()
        return row

    def compare_with_hand(self, point: str) -> None:
        """Relative error of each ours/fused output at ``point`` against the hand-written IndexCache of the same
        pattern, stored in the ours/fused row once both have run here (in either order)."""
        for row in self.rows:
            if row["point"] != point or not row["variant"].startswith(("ours", "fused")):
                continue
            got, ref = self.outputs.get((row["variant"], point)), self.outputs.get((hand_of(row["variant"]), point))
            if got is not None and ref is not None:
                err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                row["logits_rel_err_vs_hand"] = float(f"{err:.3g}")

    @staticmethod
    def label(phase, B, S, T):
        k = lambda n: f"{n // 1024}K" if n >= 1024 else str(n)  # noqa: E731
        return f"prefill {k(S)}x{k(T)}" if phase == "prefill" else f"decode b{B}@{k(T)}"

    def run_phase(self, phase: str, points: list[tuple[int, int, int]], caches, until: float):
        """points: (B, S, T). One compile per variant (first point), then every point.

        A variant starts only if its compile and points fit before ``until`` (seconds from the start)."""
        for name in (self.args.decode1_variants if phase == "decode1" else self.args.variants):
            need = (0 if name == "eager" else self.max_compile_s) + 6 * len(points)
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
                if not str(r.get("error", "")).startswith("skipped"):
                    first = False  # the compile (and its code capture) happened at this point
            del model
            torch._dynamo.reset()
            gc.collect()
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ derived numbers
    def all_rows(self) -> list[dict]:
        return self.merged_rows + self.rows

    def derived(self) -> list[dict]:
        """One line per measured (run, variant, point), with every ratio taken inside the row's own run.

        Where that run lacks the point's inductor baseline (or inductor and hand_f8, for the indexer share), they
        come from the first run that has them, and ``base_run`` / ``share_run`` name it."""
        rows = [r for r in self.all_rows() if r.get("ms")]
        by = {(r.get("run", ""), r["variant"], r["point"]): r for r in rows}

        def own_or_first(table: dict, run: str, *key):
            """``(run, entry)`` of ``table[(run, *key)]``, else of the first run that has ``key``; ``(None, None)``."""
            if (run, *key) in table:
                return run, table[(run, *key)]
            return next(((k[0], v) for k, v in table.items() if k[1:] == key), (None, None))

        shares: dict[tuple[str, str], float] = {}
        for (run, name, p), r in by.items():
            base, h8 = by.get((run, "inductor", p)), by.get((run, "hand_f8", p))
            if name == "inductor" and h8:
                shares[(run, p)] = self.L * (base["ms"] - h8["ms"]) / (self.L - 1) / base["ms"]
        points = []
        for r in self.all_rows():
            if r["point"] not in points:
                points.append(r["point"])
        order = {v: i for i, v in enumerate(ALL_VARIANTS)}
        out = []
        for p in points:
            for (run, name, _), r in sorted(((k, v) for k, v in by.items() if k[2] == p), key=lambda kv: (order[kv[0][1]], kv[0][0])):
                base_run, base = own_or_first(by, run, "inductor", p)
                share_run, share = own_or_first(shares, run, p)
                pat = variant_pattern(name, self.L)
                n_s = pat.count("S")
                d = dict(point=p, run=run, variant=name, pattern=pat, ms=r["ms"], peak_gib=r.get("peak_gib"),
                         act_peak_gib=r.get("act_peak_gib"), base_run=base_run, share_run=share_run)
                d["speedup_vs_inductor"] = round(base["ms"] / r["ms"], 3) if base else None
                d["indexer_share"] = round(share, 3) if share is not None else None
                if share is not None and not name.startswith("fused"):
                    # fused_* also speeds up its F layers: IndexCache's Amdahl ideal does not bound it
                    ideal = 1.0 / (1.0 - share * n_s / self.L)
                    d["amdahl_ideal"] = round(ideal, 3)
                    d["frac_of_ideal"] = round(d["speedup_vs_inductor"] / ideal, 3) if d["speedup_vs_inductor"] else None
                if name.startswith(("ours", "fused")):
                    hand_run, h = own_or_first(by, run, hand_of(name), p)
                    d["ours_vs_hand"] = round(h["ms"] / r["ms"], 3) if h else None
                    if hand_run not in (None, run):
                        d["hand_run"] = hand_run
                    d["logits_rel_err_vs_hand"] = r.get("logits_rel_err_vs_hand")
                out.append(d)
        return out

    def merge(self, paths: list[str]) -> None:
        """Fold in rows and compile records of earlier runs on the same card and torch (see the module docstring)."""
        for path in paths:
            with open(path) as f:
                prev = json.load(f)
            for key in ("card", "torch", "triton", "layers"):
                if prev["env"].get(key) != self.env.get(key):
                    raise SystemExit(f"--merge {path}: env field {key!r} is {prev['env'].get(key)!r} there and "
                                     f"{self.env.get(key)!r} here; only runs on the same card, torch, Triton and depth merge")
            labels = {r.get("run", "") for r in prev["raw"]}
            if self.args.phases and self.args.run_label in labels:
                raise SystemExit(f"--run-label {self.args.run_label!r} is already used in {path} ({sorted(labels)}); "
                                 "give this run a label of its own")
            known = {r.get("run", "") for r in self.merged_rows}  # a combined file repeats the runs it merged
            new = sorted(labels - known)
            self.merged_rows += [r for r in prev["raw"] if r.get("run", "") in new]
            self.compiles += [c for c in prev["compiles"] if c.get("run", "") in new]
            self.notes += [n for n in prev["notes"] if n not in self.notes]
            self.merged_env.append(prev["env"] | {"runs": new})
            self.log(f"merged runs {new} from {path} ({sorted(labels & known)} already in)")

    def write(self):
        a = self.args
        derived = self.derived()
        with open(os.path.join(a.out, "gpu_indexcache.json"), "w") as f:
            json.dump(dict(env=self.env | {"runs": sorted({r.get("run", "") for r in self.all_rows()})},
                           merged_env=self.merged_env, raw=self.all_rows(), derived=derived, compiles=self.compiles,
                           notes=self.notes), f, indent=1)
        cols = ["point", "run", "variant", "pattern", "ms", "speedup_vs_inductor", "base_run", "indexer_share", "share_run",
                "amdahl_ideal", "frac_of_ideal", "ours_vs_hand", "logits_rel_err_vs_hand", "peak_gib", "act_peak_gib"]
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
            *[f"Merged run(s) {', '.join(e['runs'])}: " + ", ".join(f"{k}={v}" for k, v in e.items() if k != "runs")
              for e in self.merged_env],
            "",
            f"Stack of {self.L} layers; freq f with index_skip_topk_offset={OFFSET}: "
            + ", ".join(f"f{f} = {executed_pattern(f, self.L)}" for f in FREQS)
            + ". Median ms; speedup over plain Inductor (all F) of the same run (else of the run named in 'baseline "
            "from'); indexer share of the stack's time from "
            "inductor vs hand_f8 (of the run named in 'share from'); Amdahl ideal = 1/(1 - share * n_S/L) (for f8 it "
            "equals hand_f8 by construction; none for fused_*, whose F layers are faster too).",
            "",
            "| point | run | variant | pattern | ms | speedup | baseline from | indexer share | share from | ideal | of ideal | "
            "ours/hand | logits rel err vs hand | peak GiB | activation peak GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        for d in derived:
            lines.append("| " + " | ".join(fmt(d.get(c)) for c in cols) + " |")
        lines += ["", "## Compiles and generated code (aten.topk calls must equal F layers)", "",
                  "| run | variant | phase | first call s | graphs | aten.topk in code | F layers | ok | pass pattern | indexers removed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in self.compiles:
            lines.append(f"| {c.get('run', '')} | {c['variant']} | {c['phase']} | {c['first_call_s']} | {c['graphs']} | "
                         f"{c['topk_calls']} | {c['f_layers']} | {c.get('topk_ok')} | {c['pass_pattern']} | {c['indexers_removed']} |")
        errs = [r for r in self.all_rows() if r.get("error")]
        if errs or self.notes:
            lines += ["", "## Skipped / failed", ""]
            lines += [f"- {r.get('run', '')} {r['variant']} {r['point']}: {r['error']}" for r in errs]
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
            # prefill: by context, then chunk; decode: by batch, then context
            order = {r["point"]: (r["T"], r["S"]) if phase == "prefill" else (r["B"], r["T"]) for r in self.all_rows()}
            pts.sort(key=lambda p: order.get(p, (0, 0)))
            x = list(range(len(pts)))
            colors = {2: "tab:blue", 4: "tab:orange", 8: "tab:green"}
            def value(p, variant, key="speedup_vs_inductor"):
                """The first run's value at this point (runs without the number are passed over)."""
                return next((d[key] for d in derived if d["point"] == p and d["variant"] == variant
                             and d.get(key) is not None), math.nan)

            for f in FREQS:
                for kind, style in (("ours", "o-"), ("hand", "s--")):
                    ys = [value(p, f"{kind}_f{f}") for p in pts]
                    ax.plot(x, ys, style, color=colors[f], label=f"{kind} f{f}", alpha=0.9 if kind == "ours" else 0.6)
                ideal = [value(p, f"hand_f{f}", "amdahl_ideal") for p in pts]
                ax.plot(x, ideal, ":", color=colors[f], lw=2, label=f"Amdahl ideal f{f}")
            for name, style, color in (("fused_f4", "D-", "tab:red"), ("eager", "x-", "gray")):
                ys = [value(p, name) for p in pts]
                label = "ours f4 + fused F-layer kernel (default)" if name == "fused_f4" else name
                ax.plot(x, ys, style, color=color, label=label)
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
        phases = self.args.phases
        if not phases:  # combine only: tables and plot of earlier runs, no device needed
            with open(self.args.merge[0]) as f:
                self.env = {k: v for k, v in json.load(f)["env"].items() if k != "runs"}
            self.L = self.env["layers"]
            self.merge(self.args.merge)
            self.write()
            self.plot()
            return
        self.build()
        self.merge(self.args.merge)
        if "prefill" in phases:
            # prefill caches: B=1, capacity T, all allocated up front (about 1.1 GiB for 6 layers at 128K)
            pre = [(1, S, T) for (S, T) in self.prefill_points]
            pre_fit = [p for p in pre if self.fits(p[1], p[2])]
            for p in pre:
                if p not in pre_fit:
                    self.notes.append(f"prefill {p[1]}x{p[2]}: skipped, its [S, 64, T] fp32 indexer logits do not fit")
                    self.log(self.notes[-1])
            later = [ph for ph in phases if ph != "prefill"]
            self.run_phase("prefill", pre_fit, self.filled_caches(pre_fit),
                           until=(0.62 if later else 1.0) * self.args.budget_s)
            self.plot()
        for phase, points, until in (("decode", self.decode_points, 0.85 if "decode1" in phases else 1.0),
                                     ("decode1", self.decode1_points, 1.0)):
            if phase not in phases:
                continue
            pts = [(B, 1, T) for (B, T) in points]
            if self.left() < 30:
                self.notes.append(f"{phase} {pts}: skipped (budget)")
                continue
            self.run_phase(phase, pts, self.filled_caches(pts), until=until * self.args.budget_s)
        self.write()
        self.plot()
        self.log(f"done in {time.time() - self.t0:.0f}s")
        # short table last (the reply carries the end of the output)
        for d in self.derived():
            print(f"{d['point']:18s} {d['run']:6s} {d['variant']:9s} {d['ms']:9.3f} ms  x{d.get('speedup_vs_inductor')}  "
                  f"share {d.get('indexer_share')} ideal {d.get('amdahl_ideal')} of-ideal {d.get('frac_of_ideal')} "
                  f"vs-hand {d.get('ours_vs_hand')} peak {d.get('peak_gib')}")
        for c in self.compiles:
            print(f"compile {c.get('run', ''):6s} {c['variant']:9s} {c['phase']:8s} {c['first_call_s']:6.1f}s topk {c['topk_calls']} F {c['f_layers']} ok {c.get('topk_ok')}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"), required="OUT" not in os.environ,
                    help="folder for this run's files (default $OUT); nothing is written into the checkout unasked")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny config: checks the script only")
    ap.add_argument("--variants", default=None, help="comma list (default: all)")
    ap.add_argument("--decode1-variants", default=None,
                    help="comma list for phase decode1 (default: as --variants); batch 1 costs a compile of its own")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    ap.add_argument("--run-label", default=time.strftime("%H%M"), help="names this run's rows (default: the time)")
    ap.add_argument("--merge", action="append", default=[], metavar="JSON",
                    help="gpu_indexcache.json of an earlier run on the same card to fold in (repeatable)")
    args = ap.parse_args()
    args.phases = [ph for ph in args.phases.split(",") if ph]
    if not args.phases and not args.merge:
        ap.error("--phases is empty (combine only): name the runs to combine with --merge")
    for ph in args.phases:
        if ph not in PHASES:
            ap.error(f"--phases: {ph!r} is not a phase; allowed: {', '.join(PHASES)}")
    def variant_list(flag: str, given: str | None, default: list[str]) -> list[str]:
        """In the order given: when the time budget runs out, the last ones are skipped."""
        if given is None:
            return default
        chosen = [v for v in given.split(",") if v]
        unknown = [v for v in chosen if v not in ALL_VARIANTS]
        if unknown:
            ap.error(f"{flag}: {unknown} unknown; allowed: {', '.join(ALL_VARIANTS)}")
        return chosen

    args.variants = variant_list("--variants", args.variants, list(ALL_VARIANTS))
    args.decode1_variants = variant_list("--decode1-variants", args.decode1_variants, args.variants)
    Runner(args).main()


if __name__ == "__main__":
    main()
