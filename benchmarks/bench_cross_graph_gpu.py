"""Issue 14, GPU point: IndexCache on a stack compiled whole vs with a graph break after every layer.

Run from the repository root on one CUDA card::

    PYTHONPATH=. python benchmarks/bench_cross_graph_gpu.py --out "$OUT" --budget-s 150

Model: ``DSAModelConfig.deepseek_v32(num_layers=L, moe=False)`` (default L=4: real V3.2 per-layer dims, indexer
64x128 heads, top-k 2048, dense MLP of the MoE's active FLOPs), bf16; one prefill point, a chunk of S tokens at the
end of a T-token context (default 1K x 32K; caches hold random rows; only the last position's logits are made).

Two forms of the same model:
  whole    ``torch.compile`` of the step: one graph holds every layer, the pass shares inside it;
  broken   a forward hook on every decoder layer calls ``torch._dynamo.graph_break()``: the break falls inside
           the layer loop, so dynamo compiles each layer's frame on its own and reuses it as several layers
           (module paths relative: no layer index at compile time); sharing is decided per call
           (``fx_indexcache.crossgraph.runtime``), the F layers publishing into a static buffer the S layers read.
Each form at three variants: ``inductor`` (plain Inductor, all layers F: the form's own baseline) and
``ours_f2`` / ``ours_f4`` (``IndexCacheBackend`` with ``index_topk_freq`` 2 / 4, ``index_skip_topk_offset=1``:
FSFS / FSSS over 4 layers; ``fuse_indexer_kernel=False``, so IndexCache alone is measured).

Reported per (form, variant): the median of CUDA-event-timed calls after two warm-up calls, the speedup over the
form's own inductor, and for each ours_fN the ratio broken speedup / whole speedup (1.0: the graph-broken stack gains
what the whole one does). Checks: the broken form's S layers read (``layer_calls``), and its logits equal the whole
form's at the same pattern (max abs difference given; bf16, other kernels, so not bitwise).

Writes ``cross_graph_gpu.json`` and ``cross_graph_gpu.md`` under --out after every variant (a run cut short keeps
what it measured); variants that would start past --budget-s are skipped and listed. ``--smoke`` runs the same
code on the CPU with the tiny config (a check of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from fx_indexcache import IndexCacheBackend, IndexCacheConfig, layer_calls  # noqa: E402
from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel  # noqa: E402
from fx_indexcache.crossgraph.runtime import CallAction  # noqa: E402

OFFSET = 1
FORMS = ("whole", "broken")
VARIANTS = ("inductor", "ours_f4", "ours_f2")  # priority order within a form


def pattern_of(variant: str, layers: int) -> str:
    if variant == "inductor":
        return "F" * layers
    freq = int(variant.split("_f")[1])
    return IndexCacheConfig(use_index_cache=True, index_topk_freq=freq,
                            index_skip_topk_offset=OFFSET).executed_pattern(layers)


def break_after_every_layer(model: ReferenceDSAModel) -> list:
    """Forward hooks that graph-break after each decoder layer; returns the handles."""
    def brk(module, args, output):
        torch._dynamo.graph_break()

    return [layer.register_forward_hook(brk) for layer in model.layers]


def compiled_step(model: ReferenceDSAModel, variant: str):
    def step(ids, cache, start_len):
        return model(ids, cache, start_len.shape[0], logits_to_keep=1)

    if variant == "inductor":
        return torch.compile(step, backend="inductor", dynamic=False), None
    backend = IndexCacheBackend(index_topk_freq=int(variant.split("_f")[1]), index_skip_topk_offset=OFFSET,
                                fuse_indexer_kernel=False)
    return torch.compile(step, backend=backend, dynamic=False), backend


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.t0 = time.time()
        self.dev = torch.device("cpu" if args.smoke else "cuda")
        self.rows: list[dict] = []
        self.logits: dict = {}
        os.makedirs(args.out, exist_ok=True)
        if args.smoke:
            self.cfg = DSAModelConfig.tiny(num_layers=args.layers, first_k_dense_layers=min(3, args.layers),
                                           dense_mlp_instead_of_moe=True, max_seq_len=4096)
            self.S, self.T, dtype = 32, 256, torch.float32
        else:
            self.cfg = DSAModelConfig.deepseek_v32(num_layers=args.layers, moe=False, max_seq_len=args.context)
            self.S, self.T, dtype = args.chunk, args.context, torch.bfloat16
        self.model = ReferenceDSAModel(self.cfg, seed=0, dtype=dtype, device=self.dev)
        self.cache = self.model.new_cache(1, max_seq_len=self.T)
        g = torch.Generator(device=self.dev).manual_seed(7)
        for t in (*self.cache.kv, *self.cache.index_k):
            t.copy_(torch.randn(t.shape, generator=g, device=self.dev, dtype=torch.float32).to(t.dtype))
        self.ids = torch.randint(0, self.cfg.vocab_size, (1, self.S), device=self.dev,
                                 generator=torch.Generator(device=self.dev).manual_seed(11))
        self.start = torch.empty(self.T - self.S, dtype=torch.uint8)
        card = torch.cuda.get_device_name(0) if self.dev.type == "cuda" else platform.processor() or "cpu"
        self.env = dict(card=card, torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                        triton=_triton_version(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                        layers=self.cfg.num_layers,
                        point=f"{self.S}x{self.T}", offset=OFFSET,
                        model=f"DSAModelConfig.deepseek_v32(num_layers={self.cfg.num_layers}, moe=False), bf16"
                        if not args.smoke else "tiny (smoke)")

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def timed(self, fn) -> tuple[float, int]:
        for _ in range(2):
            fn()
        reps = self.args.reps
        if self.dev.type != "cuda":
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times), reps
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times), reps

    def run_one(self, form: str, variant: str) -> None:
        torch._dynamo.reset()
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        hooks = break_after_every_layer(self.model) if form == "broken" else []
        row = dict(form=form, variant=variant, pattern=pattern_of(variant, self.cfg.num_layers))
        try:
            graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # cumulative: take the difference
            step, backend = compiled_step(self.model, variant)
            t = time.time()
            with torch.no_grad():
                first = step(self.ids, self.cache, self.start)
                row["compile_s"] = round(time.time() - t, 1)
                ms, reps = self.timed(lambda: step(self.ids, self.cache, self.start))
                logits = step(self.ids, self.cache, self.start).float().cpu()
            calls = layer_calls(self.model, backend)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
            row.update(ms=round(ms, 4), reps=reps, graphs=graphs,
                       layers_read=sorted(c.layer for c in calls if c.action is CallAction.READ),
                       layers_published=sorted(c.layer for c in calls if c.action is CallAction.PUBLISHED),
                       indexers_removed_in_graphs=None if backend is None else sum(
                           r.indexers_removed for r in backend.reports))
            self.logits[(form, variant)] = logits
            del first
        except Exception as error:  # a failed variant is a row, not the end of the run
            row.update(ms=None, error=f"{type(error).__name__}: {str(error)[:300]}")
        finally:
            for hook in hooks:
                hook.remove()
        self.rows.append(row)
        self.log(f"{form:6s} {variant:8s} {row.get('ms')} ms  compile {row.get('compile_s')} s  "
                 f"read {row.get('layers_read')}  {row.get('error', '')}")
        self.write()

    def summary(self) -> list[dict]:
        ms = {(r["form"], r["variant"]): r.get("ms") for r in self.rows}
        out = []
        for variant in VARIANTS[1:]:
            entry = dict(variant=variant, pattern=pattern_of(variant, self.cfg.num_layers))
            for form in FORMS:
                base, ours = ms.get((form, "inductor")), ms.get((form, variant))
                entry[f"{form}_speedup"] = round(base / ours, 3) if base and ours else None
            if entry["whole_speedup"] and entry["broken_speedup"]:
                entry["broken_over_whole"] = round(entry["broken_speedup"] / entry["whole_speedup"], 3)
            a, b = self.logits.get(("whole", variant)), self.logits.get(("broken", variant))
            if a is not None and b is not None:
                entry["logits_max_abs_diff_broken_vs_whole"] = float((a - b).abs().max())
            out.append(entry)
        return out

    def write(self) -> None:
        summary = self.summary()
        with open(os.path.join(self.args.out, "cross_graph_gpu.json"), "w") as f:
            json.dump(dict(env=self.env, rows=self.rows, summary=summary), f, indent=1)
        env = self.env
        lines = [f"# Cross-graph IndexCache, {env['card']}, torch {env['torch']}, Triton {env['triton']}",
                 "", f"{self.env['model']}; prefill {self.env['point']} (chunk x context), batch 1; "
                 f"median of {self.args.reps} CUDA-event-timed calls after 2 warm-ups.", "",
                 "| form | variant | pattern | ms | compile s | S layers read (broken) |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['form']} | {r['variant']} | {r['pattern']} | {r.get('ms', '-')} | "
                         f"{r.get('compile_s', '-')} | {r.get('layers_read', '-') if r['form'] == 'broken' else '-'} |"
                         + (f" {r['error']}" if r.get("error") else ""))
        lines += ["", "| variant | pattern | whole speedup | broken speedup | broken / whole | logits max abs diff |",
                  "|---|---|---|---|---|---|"]
        for s in summary:
            lines.append(f"| {s['variant']} | {s['pattern']} | {s['whole_speedup']} | {s['broken_speedup']} | "
                         f"{s.get('broken_over_whole', '-')} | {s.get('logits_max_abs_diff_broken_vs_whole', '-')} |")
        with open(os.path.join(self.args.out, "cross_graph_gpu.md"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def run(self) -> None:
        self.log(f"{self.env}")
        order = [(form, variant) for variant in VARIANTS for form in FORMS]  # both forms of a variant together
        for form, variant in order:
            if time.time() - self.t0 > self.args.budget_s:
                self.rows.append(dict(form=form, variant=variant, pattern=pattern_of(variant, self.cfg.num_layers),
                                      ms=None, error="skipped: past the time budget"))
                self.log(f"{form} {variant}: skipped (budget)")
                continue
            self.run_one(form, variant)
        self.write()
        for s in self.summary():
            self.log(f"summary {s}")


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny config: checks the script only")
    args = ap.parse_args()
    if args.smoke:
        args.reps = min(args.reps, 3)
    Bench(args).run()


if __name__ == "__main__":
    main()
