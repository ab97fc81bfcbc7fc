"""transformers generate() decode tokens/s for DeepSeek-V3.2 at indexer-realistic sizes, compiled with CUDA graphs:
plain Inductor all-F against ``IndexCacheBackend`` (issue 12).

    PYTHONPATH=. python benchmarks/bench_generate.py --out "$OUT" --budget-s 300

The model is transformers' ``DeepseekV32ForCausalLM`` with random weights (``tiny_transformers.build`` with overrides): the
real indexer (64 heads x 128, top-k 2048) inside a smaller model (``--layers``, hidden 2048, MLA 16 heads, a small
MoE), bf16. Both variants use the static-cache recipe, ``model.forward = torch.compile(model.forward, backend=...,
mode="reduce-overhead")`` (``dynamic=True``), one ``StaticCache`` of ``max(prompts) + new tokens`` rows reused (reset)
by every call, greedy, ``disable_compile=True`` (only this compile runs), and a chunked prefill (``--chunk``; the
[chunk, 64, T] fp32 indexer logits of transformers' code must fit). Decode tokens/s = batch x new tokens /
(t(generate 1 + N tokens) - t(generate 1 token)), best of ``--repeats``; the compile is excluded (a first call per
prompt length warms up). ours = ``IndexCacheBackend(index_topk_freq=4, index_skip_topk_offset=1,
fuse_indexer_kernel=...)`` (``ours_f4_fused``: the backend's CUDA default). ``--prewarm`` compiles every variant
in a worker process first, all at once (``benchmarks/prewarm.py``). Writes generate.{json,md} and generate_log.txt.
``--smoke``: the tiny model on the CPU (checks the script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from benchmarks.prewarm import add_arguments, describe, prewarm_if_asked  # noqa: E402
from fx_indexcache import IndexCacheBackend, prepared_static_cache  # noqa: E402
from fx_indexcache.models import tiny_transformers  # noqa: E402
from fx_indexcache.detection.registry import LayerSource  # noqa: E402

VARIANTS = ("inductor", "ours_f4", "ours_f4_fused")


def backend_for(name: str):
    """plain Inductor all-F; ours at freq 4 (offset 1) with IndexCache alone, or with the fused kernel too."""
    if name == "inductor":
        return "inductor"
    if name not in VARIANTS:
        raise ValueError(f"--variants: {name!r} is not one of {VARIANTS}")
    return IndexCacheBackend(index_topk_freq=4, index_skip_topk_offset=1, fuse_indexer_kernel=name.endswith("fused"))

REALISTIC = dict(
    hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1024, num_attention_heads=16,
    num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=256, qk_rope_head_dim=64, qk_nope_head_dim=128,
    v_head_dim=128, index_n_heads=64, index_head_dim=128, index_topk=2048, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, vocab_size=32000, max_position_embeddings=65536,
)


def removed_per_graph(backend) -> list:
    """Indexers removed in each graph the backend compiled; "cached" where Inductor's FX graph cache served it
    (the pass ran in the process that made the entry, e.g. a prewarm worker, whose log has the count)."""
    return sorted({"cached" if r.layer_source is LayerSource.FX_GRAPH_CACHE else r.indexers_removed
                   for r in getattr(backend, "reports", [])}, key=str)


class GenerateBench:
    def __init__(self, a) -> None:
        self.a = a
        self.t0 = time.time()
        self.log_f = open(os.path.join(a.out, "generate_log.txt"), "a")
        self.dev = torch.device("cpu" if a.smoke else "cuda")
        overrides = {} if a.smoke else REALISTIC
        self.tiny = tiny_transformers.build(tiny_transformers.SPECS["deepseek_v32"], num_layers=a.layers, **overrides)
        self.model = self.tiny.model.to(self.dev, torch.float32 if a.smoke else torch.bfloat16)
        self.prompts = [int(p) for p in a.prompts.split(",")]
        self.rows: list[dict] = []
        self.env = dict(card=torch.cuda.get_device_name(0) if self.dev.type == "cuda" else "cpu",
                        torch=torch.__version__, python=platform.python_version(),
                        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), layers=a.layers, batch=a.batch,
                        new_tokens=a.new_tokens, chunk=a.chunk, config="tiny (smoke)" if a.smoke else REALISTIC)
        import transformers

        self.env["transformers"] = transformers.__version__

    def log(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log_f.write(line + "\n")
        self.log_f.flush()

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def generate(self, ids, new_tokens: int, cache):
        cache.reset()
        return self.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   past_key_values=cache, disable_compile=True,
                                   prefill_chunk_size=min(self.a.chunk, ids.shape[1]))

    def timed(self, ids, new_tokens: int, cache) -> float:
        best = float("inf")
        for _ in range(self.a.repeats):
            self.sync()
            t = time.perf_counter()
            with torch.no_grad():
                self.generate(ids, new_tokens, cache)
            self.sync()
            best = min(best, time.perf_counter() - t)
        return best

    def run_variant(self, name: str, backend, compile_only: bool = False) -> None:
        torch._dynamo.reset()
        self.model.__dict__.pop("forward", None)
        # buffers allocated eagerly: transformers 5.17 + torch 2.11 cannot trace their lazy allocation
        cache = prepared_static_cache(self.model, self.a.batch, max(self.prompts) + self.a.new_tokens + 1)
        self.model.forward = torch.compile(self.model.forward, backend=backend, mode="reduce-overhead", dynamic=True)
        for P in self.prompts:
            if time.time() - self.t0 > self.a.budget_s:
                self.log(f"{name} P={P}: skipped (budget)")
                continue
            ids = torch.randint(2, self.model.config.vocab_size, (self.a.batch, P), device=self.dev,
                                generator=torch.Generator(device=self.dev).manual_seed(P))
            t = time.time()
            with torch.no_grad():
                out = self.generate(ids, self.a.new_tokens + 1, cache)  # warm-up: compiles prefill and decode
                self.generate(ids, 1, cache)  # and the prefill-only call the timing makes
            warm = time.time() - t
            if compile_only:  # a prewarm worker: its compiles ran the pass (the measuring process hits the cache)
                self.log(f"{name} P={P}: compiled (warm-up {warm:.1f}s), indexers removed per graph "
                         f"{removed_per_graph(backend)}")
                return
            prefill = self.timed(ids, 1, cache)
            full = self.timed(ids, self.a.new_tokens + 1, cache)
            row = dict(variant=name, prompt=P, warmup_s=round(warm, 1), prefill_s=round(prefill, 4),
                       generate_s=round(full, 4),
                       decode_tok_s=round(self.a.batch * self.a.new_tokens / max(full - prefill, 1e-9), 1),
                       graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"],
                       tokens=out[0, P:].tolist()[:8])
            if hasattr(backend, "reports"):
                row["reports_removed"] = removed_per_graph(backend)
            self.rows.append(row)
            self.log(json.dumps(row))
            self.write()

    def write(self) -> None:
        with open(os.path.join(self.a.out, "generate.json"), "w") as f:
            json.dump(dict(env=self.env, rows=self.rows), f, indent=1)
        base = {r["prompt"]: r for r in self.rows if r["variant"] == "inductor"}
        lines = ["# transformers generate(), decode tokens/s under CUDA graphs", "",
                 "Environment: " + ", ".join(f"{k}={v}" for k, v in self.env.items()), "",
                 "| variant | prompt | prefill s | decode tok/s | vs inductor | warm-up s | indexers removed |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            ratio = r["decode_tok_s"] / base[r["prompt"]]["decode_tok_s"] if r["prompt"] in base else None
            lines.append(f"| {r['variant']} | {r['prompt']} | {r['prefill_s']} | {r['decode_tok_s']} | "
                         f"{'' if ratio is None else f'{ratio:.3f}x'} | {r['warmup_s']} | {r.get('reports_removed', '')} |")
        with open(os.path.join(self.a.out, "generate.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"), required="OUT" not in os.environ,
                    help="folder for this run's files (default $OUT); nothing is written into the checkout unasked")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompts", default="8192,16384,32768")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="inductor,ours_f4_fused", help=f"comma list of {VARIANTS}")
    ap.add_argument("--smoke", action="store_true")
    add_arguments(ap)
    a = ap.parse_args()
    names = a.variants.split(",")
    backends = {n: backend_for(n) for n in names}
    if a.smoke:
        a.prompts, a.new_tokens, a.chunk, a.layers = "12,20", 4, 8, 3
    os.makedirs(a.out, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    args = ["--layers", str(a.layers), "--batch", str(a.batch), "--prompts", a.prompts, "--new-tokens",
            str(a.new_tokens), "--chunk", str(a.chunk), "--out", os.path.join(a.out, "prewarm")]
    warmed = prewarm_if_asked(a, __file__, names, args + (["--smoke"] if a.smoke else []))
    if a.prewarm_only:
        return
    bench = GenerateBench(a)
    if warmed is not None:
        bench.env["prewarm"] = describe(warmed)
        bench.log(bench.env["prewarm"])
    for name in names:
        try:
            bench.run_variant(name, backends[name], compile_only=a.compile_only)
        except Exception as e:  # one variant failing does not lose the others' rows
            bench.log(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            if a.compile_only:
                raise
    if a.compile_only:
        return
    print(open(os.path.join(a.out, "generate.md")).read())


if __name__ == "__main__":
    main()
