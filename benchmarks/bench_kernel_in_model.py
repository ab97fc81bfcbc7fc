"""The fused indexer kernel inside compiled reference-model code: with vs without ``substitute_fused_indexer``.

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python benchmarks/bench_kernel_in_model.py --out "$OUT" [--budget-s 300]

Everything is bf16 at DeepSeek-V3.2's indexer dims (64 heads x 128, top-k 2048), one prefill chunk of
S queries at the end of a T-key cache (start_pos = T - S, so the causal mask hides nothing of the
first T - S keys). Each case compiles the same code twice with Inductor: once with a post-grad pass
that only detects the sites ("inductor"), once with the same pass plus the substitution ("fused"),
then checks and times both (triton.testing.do_bench medians):

  * ``indexer``: the reference ``LightningIndexer`` math (``fx_indexcache.models.reference``) wrapped so that
    the masked score is returned too: logits compared on their finite entries (relative norm error,
    max |diff| / max |score|; -inf positions must agree), top-k sets compared (mean overlap, and the
    largest "tie gap": how far below the K-th best score, by the inductor logits, any key picked only
    by the fused variant lies, over max |score|);
  * ``layer``: one whole ``DSADecoderLayer`` (MLA absorbed attention over the top-k + dense MLP at V3.2
    dims): layer outputs compared (relative norm error; bf16), indices compared as above;
  * ``model`` (if time is left): a 4-layer reference model (real indexer/attention dims, hidden 2048)
    under IndexCache "FSFS" with and without substitution: final logits and per-layer indices.

Writes kernel_in_model.{csv,md,json} and a log under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: E402

from fx_indexcache import IndexCacheConfig, IndexCachePass, detect  # noqa: E402
from fx_indexcache.fuse.substitute import substitute_fused_indexer  # noqa: E402
from fx_indexcache.models.reference import DSADecoderLayer, DSAModelConfig, LightningIndexer, ReferenceDSAModel  # noqa: E402
from fx_indexcache.models.reference.model import _write_rows, rope_tables  # noqa: E402

S_DEFAULT = 1024
T_LIST = (32768, 16384, 8192)
RESULTS: list[dict] = []
LOG: list[str] = []


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    LOG.append(line)


class BenchPass(CustomGraphPass):
    """Post-grad pass: optional IndexCache rewrite, then (optionally) the kernel substitution."""

    def __init__(self, substitute: bool, pattern: str | None = None) -> None:
        self.substitute = substitute
        self.index_cache = IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern, fuse_indexer_kernel=False)) if pattern else None
        self.notes: list[str] = []
        self.fused = 0

    def __call__(self, graph) -> None:
        if self.index_cache is not None:
            self.index_cache.run(graph)
        sites = detect(graph).sites
        if self.substitute:
            records = substitute_fused_indexer(graph, sites)
            self.notes += [r.note() for r in records]
            self.fused += sum(r.fused for r in records)
        else:
            self.notes.append(f"{len(sites)} site(s) left to Inductor")

    def uuid(self):
        return None  # never cache: the two variants must both compile


def compiled(fn, substitute: bool, pattern: str | None = None):
    graph_pass = BenchPass(substitute, pattern)
    if SMOKE:
        from fx_indexcache.integrations.backend import aten_graph_backend

        def rewrite(module):
            graph_pass(module.graph)
            module.recompile()
            return module.forward

        return torch.compile(fn, backend=aten_graph_backend(rewrite), dynamic=False), graph_pass
    opts = {"post_grad_custom_post_pass": graph_pass, "fx_graph_cache": False}
    return torch.compile(fn, backend="inductor", options=opts, dynamic=False), graph_pass


class IndexerProbe(nn.Module):
    """``LightningIndexer.forward`` (reference model) returning the masked score next to its top-k."""

    def __init__(self, indexer: nn.Module) -> None:
        super().__init__()
        self.ix = indexer

    def forward(self, x, q_latent, cos, sin, query_slot, key_cache, start_pos: int):
        ix = self.ix
        B, S, _ = x.shape
        q = ix._rope(ix.wq_b(q_latent).view(B, S, ix.n_heads, ix.head_dim), cos, sin)
        k = ix._rope(ix.k_norm(ix.wk(x)), cos, sin)
        keys = _write_rows(key_cache, k, start_pos)
        T = keys.shape[1]
        w = ix.weights_proj(x).float() * ix.weight_scale
        logits = torch.einsum("bshd,btd->bsht", q.float(), keys.float())
        score = torch.einsum("bsh,bsht->bst", w, F.relu(logits))
        future = torch.arange(T, device=x.device)[None, :] > query_slot[:, None]
        score = score.masked_fill(future, float("-inf"))
        return score, score.topk(min(ix.topk, T), dim=-1).indices


def bench(fn) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_scores(fused: torch.Tensor, base: torch.Tensor) -> dict:
    fin_f, fin_b = torch.isfinite(fused), torch.isfinite(base)
    same_mask = bool(torch.equal(fin_f, fin_b))
    a, b = fused[fin_b], base[fin_b]
    scale = float(b.abs().max().clamp_min(1e-30))
    return {
        "mask_equal": same_mask,
        "logits_rel_err": rel_err(a, b),
        "logits_max_diff_over_max": float((a.double() - b.double()).abs().max()) / scale,
        "nan": bool(torch.isnan(fused).any()),
    }


def compare_topk(idx_f: torch.Tensor, idx_b: torch.Tensor, base_score: torch.Tensor) -> dict:
    """Set overlap and the largest tie gap (by the baseline's logits) of keys only the fused variant picked."""
    K = idx_b.shape[-1]
    rows_f = idx_f.reshape(-1, K).long()
    rows_b = idx_b.reshape(-1, K).long()
    sc = base_score.reshape(rows_b.shape[0], -1).float()
    kth = torch.gather(sc, 1, rows_b).min(dim=1).values  # the K-th best score of the baseline's picks
    picked_f = torch.gather(sc, 1, rows_f)
    both = torch.zeros_like(sc, dtype=torch.int8)
    both.scatter_(1, rows_b, 1)
    in_b = torch.gather(both, 1, rows_f).bool()
    overlap = float(in_b.float().mean())
    fin = torch.isfinite(kth)
    gap = (kth[:, None] - picked_f).masked_fill(in_b, 0.0)
    gap = gap[fin].clamp_min(0.0)
    gap_max = float(gap.max()) if gap.numel() else 0.0
    scale = float(sc[torch.isfinite(sc)].abs().max().clamp_min(1e-30))
    return {
        "topk_overlap": overlap,
        "rows_differing": int((~in_b).any(dim=1).sum()),
        "rows": int(rows_b.shape[0]),
        "tie_gap_over_max": gap_max / scale,
    }


def record(row: dict, out: str) -> None:
    RESULTS.append(row)
    log(json.dumps(row))
    write(out)


def write(out: str) -> None:
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    keys: list[str] = []
    for r in RESULTS:
        keys += [k for k in r if k not in keys]
    with open(os.path.join(out, "kernel_in_model.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(RESULTS)
    with open(os.path.join(out, "kernel_in_model.json"), "w") as f:
        json.dump({"env": ENV, "results": RESULTS}, f, indent=1)
    with open(os.path.join(out, "kernel_in_model_log.txt"), "w") as f:
        f.write("\n".join(LOG) + "\n")
    md = [f"# Fused indexer kernel inside compiled reference code ({ENV.get('gpu')}, torch {ENV.get('torch')}, "
          f"Triton {ENV.get('triton')})", "",
          "| case | B | S | T | inductor ms | fused ms | speed-up | saved ms | logits rel err | topk overlap | tie gap/max | out rel err |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in RESULTS:
        if "inductor_ms" not in r:
            continue
        md.append(
            f"| {r['case']} | {r['B']} | {r['S']} | {r['T']} | {r['inductor_ms']:.3f} | {r['fused_ms']:.3f} | "
            f"{r['inductor_ms'] / r['fused_ms']:.2f}x | {r['inductor_ms'] - r['fused_ms']:.3f} | "
            f"{r.get('logits_rel_err', float('nan')):.2e} | {r.get('topk_overlap', float('nan')):.5f} | "
            f"{r.get('tie_gap_over_max', float('nan')):.1e} | {r.get('out_rel_err', float('nan')):.2e} |"
        )
    with open(os.path.join(out, "kernel_in_model.md"), "w") as f:
        f.write("\n".join(md) + "\n")


ENV: dict = {}


DEV = "cuda"
SMOKE = False
EXTRA_CHECKS = False


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def v32_config(**overrides) -> DSAModelConfig:
    if SMOKE:  # CPU dry run of the script's code paths (tiny dims, AOT graph, no timing value)
        return DSAModelConfig.tiny(**{"num_layers": 4, "first_k_dense_layers": 4, **overrides})
    return DSAModelConfig.deepseek_v32(num_layers=4, moe=False, **overrides)


def rope_inputs(cfg: DSAModelConfig, S: int, start: int, dev):
    pos = torch.arange(S, device=dev) + start
    cos, sin = rope_tables(pos, cfg.qk_rope_head_dim, cfg.rope_theta)
    return cos, sin, pos


def compile_pair(module, args, row: dict, pattern: str | None = None):
    """Compile ``module`` with Inductor alone and with the substitution, run each once (timing the
    compile) and note in ``row`` what was fused. Returns both compiled functions and both outputs."""
    f_base, _ = compiled(module, False, pattern)
    f_fused, p_fused = compiled(module, True, pattern)
    t0 = time.time()
    out_base = f_base(*args)
    row["compile_inductor_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    out_fused = f_fused(*args)
    row["compile_fused_s"] = round(time.time() - t0, 1)
    sync()
    row["notes"] = " | ".join(p_fused.notes)
    row["fused_sites"] = p_fused.fused
    return f_base, f_fused, out_base, out_fused


def row_overlaps(a: torch.Tensor, b: torch.Tensor, rows: int = 64) -> list[float]:
    """Per query row (the first ``rows``): the fraction of ``b``'s selected keys that ``a`` selects too."""
    a, b = a.reshape(-1, a.shape[-1])[:rows], b.reshape(-1, b.shape[-1])[:rows]
    return [len(set(x.tolist()) & set(y.tolist())) / len(y) for x, y in zip(a, b)]


def case_indexer(T: int, S: int, out: str) -> None:
    dev = DEV
    cfg = v32_config()
    torch.manual_seed(T)
    with torch.device(DEV):
        indexer = LightningIndexer(cfg)
    probe = IndexerProbe(indexer).to(torch.bfloat16).eval()
    B = 1
    x = torch.randn(B, S, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    ql = torch.randn(B, S, cfg.q_lora_rank, device=dev, dtype=torch.bfloat16)
    cache = torch.randn(B, T, cfg.index_head_dim, device=dev, dtype=torch.bfloat16)
    cos, sin, slot = rope_inputs(cfg, S, T - S, dev)
    args = (x, ql, cos, sin, slot, cache, T - S)
    row = {"case": "indexer", "B": B, "S": S, "T": T}
    with torch.no_grad():
        f_base, f_fused, (s_b, i_b), (s_f, i_f) = compile_pair(probe, args, row)
        row.update(compare_scores(s_f, s_b))
        row.update(compare_topk(i_f, i_b, s_b))
        if EXTRA_CHECKS:
            # eager (q, k rounded to bf16 before the fp32 product, as the model code says) and Inductor with
            # emulate_precision_casts (keeps that rounding inside fused kernels): which one does fused match?
            s_e, _ = probe(*args)
            fin = torch.isfinite(s_b)
            row["rel_err_fused_vs_eager"] = rel_err(s_f[fin], s_e[fin])
            row["rel_err_inductor_vs_eager"] = rel_err(s_b[fin], s_e[fin])
            del s_e
            graph_pass = BenchPass(False)
            opts = {"post_grad_custom_post_pass": graph_pass, "fx_graph_cache": False, "emulate_precision_casts": True}
            f_emul = torch.compile(probe, backend="inductor", options=opts, dynamic=False)
            s_m, _ = f_emul(*args)
            row["rel_err_fused_vs_inductor_emulated_casts"] = rel_err(s_f[fin], s_m[fin])
            del s_m, f_emul
        del s_b, i_b, s_f, i_f
        torch.cuda.empty_cache()
        row["inductor_ms"] = bench(lambda: f_base(*args))
        row["fused_ms"] = bench(lambda: f_fused(*args))
    record(row, out)
    del f_base, f_fused, probe
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def case_layer(T: int, S: int, out: str) -> None:
    dev = DEV
    cfg = v32_config()
    torch.manual_seed(1000 + T)
    with torch.device(dev):
        layer = DSADecoderLayer(cfg, 3)
    layer = layer.to(torch.bfloat16).eval()
    B = 1
    h = torch.randn(B, S, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(B, T, cfg.kv_cache_dim, device=dev, dtype=torch.bfloat16)
    ic = torch.randn(B, T, cfg.index_head_dim, device=dev, dtype=torch.bfloat16)
    cos, sin, slot = rope_inputs(cfg, S, T - S, dev)
    args = (h, cos, sin, slot, kv, ic, T - S)
    row = {"case": "layer", "B": B, "S": S, "T": T}
    with torch.no_grad():
        f_base, f_fused, (o_b, i_b), (o_f, i_f) = compile_pair(layer, args, row)
        row["out_rel_err"] = rel_err(o_f, o_b)
        overlaps = row_overlaps(i_f, i_b)
        row["topk_overlap"] = sum(overlaps) / len(overlaps)
        del o_b, i_b, o_f, i_f
        torch.cuda.empty_cache()
        row["inductor_ms"] = bench(lambda: f_base(*args))
        row["fused_ms"] = bench(lambda: f_fused(*args))
    record(row, out)
    del f_base, f_fused, layer
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def case_model(T: int, S: int, out: str) -> None:
    dev = DEV
    small = dict(hidden_size=2048, vocab_size=4096, intermediate_size=4096, moe_intermediate_size=512)
    cfg = v32_config(first_k_dense_layers=4, max_seq_len=T, **({} if SMOKE else small))
    model = ReferenceDSAModel(cfg, seed=0, dtype=torch.bfloat16, device=dev)
    B = 1
    ids = torch.randint(0, cfg.vocab_size, (B, S), device=dev)
    cache = model.new_cache(B, max_seq_len=T)
    gen = torch.Generator(device=dev).manual_seed(7)
    for t in (*cache.kv, *cache.index_k):
        t.copy_(torch.randn(t.shape, generator=gen, device=dev, dtype=torch.float32))
    args = (ids, cache, T - S, True)
    row = {"case": "model FSFS", "B": B, "S": S, "T": T}
    with torch.no_grad():
        f_base, f_fused, (l_b, i_b), (l_f, i_f) = compile_pair(model, args, row, pattern="FSFS")
        row["out_rel_err"] = rel_err(l_f, l_b)
        overlaps = [value for a, b in zip(i_f, i_b) for value in row_overlaps(a, b)]
        row["topk_overlap"] = sum(overlaps) / len(overlaps)
        del l_b, i_b, l_f, i_f
        torch.cuda.empty_cache()
        row["inductor_ms"] = bench(lambda: f_base(*args))
        row["fused_ms"] = bench(lambda: f_fused(*args))
    record(row, out)
    del f_base, f_fused, model, cache
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def compile_stack(model, fuse: bool):
    """The default ``indexcache_backend`` (fusion on) or the same with ``fuse_indexer_kernel=False``."""
    from fx_indexcache import indexcache_backend

    if SMOKE:  # CPU: the graph pass fuses CUDA sites only, so run the substitution by hand
        from fx_indexcache.integrations.backend import aten_graph_backend

        graph_pass = IndexCachePass(IndexCacheConfig())

        def rewrite(module):
            graph_pass.run(module.graph)
            if fuse:
                substitute_fused_indexer(module.graph, detect(module.graph).sites)
            module.recompile()
            return module.forward

        return torch.compile(model, backend=aten_graph_backend(rewrite), dynamic=False)
    options = {"fx_graph_cache": False, **({} if fuse else {"fuse_indexer_kernel": False})}
    return torch.compile(model, backend=indexcache_backend, options=options, dynamic=False)


def time_ms(fn, reps: int = 3) -> float:
    """Median of a few CUDA-event timed calls after one warm-up (for calls of 10-500 ms)."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def case_stack(T: int, S: int, out: str) -> None:
    """Our own unbatched DSA stack (tests/indexer_stack.py: masked_fill, [S, H, T] mul+sum, a cat-ed key
    cache) at V3.2 indexer dims, 4 layers, ``indexcache_backend``'s defaults (its IndexCache pattern), with
    and without the fused kernel; ``fused_sites`` must equal the pattern's F count."""
    from torch._dynamo.utils import counters

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from indexer_stack import UnbatchedDSAStack

    dims = dict(hidden=64, heads=4, head_dim=16, topk=8) if SMOKE else dict(hidden=2048, heads=64, head_dim=128, topk=2048)
    torch.manual_seed(T)
    model = UnbatchedDSAStack(num_layers=4, **dims).to(device=DEV, dtype=torch.bfloat16).eval()
    past_k, past_v = model.empty_cache(T - S, DEV, torch.bfloat16)
    x = torch.randn(S, dims["hidden"], device=DEV, dtype=torch.bfloat16)
    pattern = IndexCacheConfig.from_options({})[0].pattern_for(len(model.layers))  # the backend's default
    row = {"case": f"own unbatched stack, 4 layers, default {pattern}", "B": 1, "S": S, "T": T, "pattern": pattern}
    with torch.no_grad():
        before = counters["fx_indexcache"]["indexers_fused"]
        f_fused = compile_stack(model, fuse=True)
        t0 = time.time()
        o_f, i_f = f_fused(x, past_k, past_v)
        row["compile_fused_s"] = round(time.time() - t0, 1)
        row["fused_sites"] = counters["fx_indexcache"]["indexers_fused"] - before
        torch._dynamo.reset()
        f_base = compile_stack(model, fuse=False)
        t0 = time.time()
        o_b, i_b = f_base(x, past_k, past_v)
        row["compile_inductor_s"] = round(time.time() - t0, 1)
        row["out_rel_err"] = rel_err(o_f, o_b)
        overlaps = [value for a, b in zip(i_f, i_b) for value in row_overlaps(a, b)]
        row["topk_overlap"] = sum(overlaps) / len(overlaps)
        del o_f, i_f, o_b, i_b
        torch.cuda.empty_cache() if DEV == "cuda" else None
        row["inductor_ms"] = time_ms(lambda: f_base(x, past_k, past_v))
        row["fused_ms"] = time_ms(lambda: f_fused(x, past_k, past_v))
    record(row, out)
    del f_base, f_fused, model
    torch._dynamo.reset()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def case_native_stack(T: int, S: int, out: str, layers: int = 8, indexer: str = "native_einsum",
                      dtype: torch.dtype = torch.bfloat16) -> None:
    """Issue 28's stack: every indexer op in the model's dtype (``tests/indexer_stack.py``, ``indexer="native_einsum"``:
    ``torch.einsum("shd,td->sht", q, kcache).relu()``, mul+sum head sum, ``masked_fill``, all bf16), 8 layers at
    V3.2 indexer dims, ``indexcache_backend``'s defaults (fused, under the fp32-inside contract) against the same
    backend with ``fuse_indexer_kernel=False`` (unfused), side by side in one process."""
    import fx_indexcache
    from torch._dynamo.utils import counters

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from indexer_stack import UnbatchedDSAStack

    dims = dict(hidden=64, heads=4, head_dim=16, topk=8) if SMOKE else dict(hidden=2048, heads=64, head_dim=128, topk=2048)
    torch.manual_seed(T)
    model = UnbatchedDSAStack(num_layers=layers, indexer=indexer, **dims).to(device=DEV, dtype=dtype).eval()
    past_k, past_v = model.empty_cache(T - S, DEV, dtype)
    x = torch.randn(S, dims["hidden"], device=DEV, dtype=dtype)
    pattern = IndexCacheConfig.from_options({})[0].pattern_for(len(model.layers))  # the backend's default
    row = {"case": f"native {str(dtype).removeprefix('torch.')} unbatched stack ({indexer}), {layers} layers, "
                   f"default {pattern}", "B": 1, "S": S, "T": T, "pattern": pattern, "layers": layers,
           "indexer": indexer, "dtype": str(dtype).removeprefix("torch."),
           "heads": dims["heads"], "head_dim": dims["head_dim"], "topk": dims["topk"]}
    with torch.no_grad():
        before = counters["fx_indexcache"]["indexers_fused"]
        fx_indexcache.clear_reports()
        f_fused = compile_stack(model, fuse=True)
        t0 = time.time()
        o_f, i_f = f_fused(x, past_k, past_v)
        row["compile_fused_s"] = round(time.time() - t0, 1)
        row["fused_sites"] = counters["fx_indexcache"]["indexers_fused"] - before
        row["f_layers"] = pattern.count("F")
        fusions = [f for r in fx_indexcache.reports() for f in r.fusions]
        row["numerics"] = sorted({str(f.numerics) for f in fusions if f.fused})
        row["fusion_notes"] = [f.note() for f in fusions]
        torch._dynamo.reset()
        f_base = compile_stack(model, fuse=False)
        t0 = time.time()
        o_b, i_b = f_base(x, past_k, past_v)
        row["compile_unfused_s"] = round(time.time() - t0, 1)
        row["out_rel_err"] = rel_err(o_f, o_b)
        f_layers = [i for i, c in enumerate(pattern) if c == "F"]
        overlaps = [value for i in f_layers for value in row_overlaps(i_f[i], i_b[i], rows=256)]
        row["topk_overlap_f_layers"] = sum(overlaps) / len(overlaps)
        del o_f, i_f, o_b, i_b
        torch.cuda.empty_cache() if DEV == "cuda" else None
        row["inductor_ms"] = time_ms(lambda: f_base(x, past_k, past_v), reps=5)  # unfused
        row["fused_ms"] = time_ms(lambda: f_fused(x, past_k, past_v), reps=5)
        row["inductor_ms_again"] = time_ms(lambda: f_base(x, past_k, past_v), reps=5)  # drift check
        row["speedup"] = row["inductor_ms"] / row["fused_ms"]
    record(row, out)
    del f_base, f_fused, model
    torch._dynamo.reset()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def case_native_stack_fp16_matmul(T: int, S: int, out: str) -> None:
    """The same stack in fp16 with ``torch.matmul(q, kcache.T)`` instead of einsum."""
    case_native_stack(T, S, out, indexer="native_matmul", dtype=torch.float16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--S", type=int, default=S_DEFAULT)
    ap.add_argument("--smoke", action="store_true", help="CPU dry run at tiny dims (code paths only)")
    ap.add_argument("--plan", default="", help="e.g. indexer:32768,layer:8192 (default: the full plan)")
    ap.add_argument("--extra-checks", action="store_true", help="indexer: also compare with eager and emulated casts")
    args = ap.parse_args()
    global DEV, SMOKE, T_LIST, EXTRA_CHECKS
    EXTRA_CHECKS = args.extra_checks
    if args.smoke:
        from fx_indexcache.fuse import substitute as kernel_substitution

        kernel_substitution.kernel_refusal = lambda q, k, w, scale: None  # CPU: the op runs its reference
        DEV, SMOKE, T_LIST = "cpu", True, (64, 48, 32)
        args.S = 16
        ENV.update(gpu="cpu smoke", torch=torch.__version__, triton="-")
    else:
        import triton

        from bench_environment import describe_machine

        machine = describe_machine()
        ENV.update(gpu=machine["device"], torch=torch.__version__, triton=triton.__version__, driver=machine["driver"],
                   cuda=machine["cuda"], commit=machine["commit"])
    ENV["date"] = time.strftime("%Y-%m-%d %H:%M")
    log(json.dumps(ENV))
    start = time.time()
    plan = [(case_indexer, T_LIST[0]), (case_layer, T_LIST[0]), (case_indexer, T_LIST[2]),
            (case_model, T_LIST[2]), (case_indexer, T_LIST[1]), (case_layer, T_LIST[2])]
    est = {case_indexer: 40, case_layer: 80, case_model: 120, case_stack: 90, case_native_stack: 120,
           case_native_stack_fp16_matmul: 120}
    if args.plan:
        cases = {"indexer": case_indexer, "layer": case_layer, "model": case_model, "stack": case_stack,
                 "native_stack": case_native_stack, "native_stack_fp16_matmul": case_native_stack_fp16_matmul}
        plan = [(cases[c.split(":")[0]], int(c.split(":")[1])) for c in args.plan.split(",")]
    for fn, T in plan:
        left = args.budget_s - (time.time() - start)
        if left < est[fn]:
            log(f"skip {fn.__name__} T={T}: {left:.0f}s left")
            continue
        try:
            fn(T, args.S, args.out)
        except Exception as e:  # keep going: one failure must not lose the other rows
            import traceback

            log(f"FAILED {fn.__name__} T={T}: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    write(args.out)
    if args.out:
        print(open(os.path.join(args.out, "kernel_in_model.md")).read())


if __name__ == "__main__":
    main()
