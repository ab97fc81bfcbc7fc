"""Benchmark the fused lightning-indexer kernel against Inductor and the card's floors.

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python benchmarks/bench_indexer_kernel.py --out "$OUT" [--sweep] [--budget-s 420]

Measures, on the card it runs on and in the same process:
  * the card's bf16 matrix-product rate (8192^3, random data) and device-to-device copy bandwidth
    (bytes read + written), used for the floors;
  * per shape: the logits kernel, torch.topk on its output (sorted and unsorted), the fused
    ``lightning_indexer`` (logits + top-k), and ``torch.compile`` (Inductor) of transformers-style
    indexer code (einsum, ReLU, weighted head sum, mask, top-k) where its [S, H, T] intermediate fits;
  * floors: compute = 2*H*D*(visible query-key pairs) / matmul rate; memory = (q + k + w read,
    fp32 logits written) / copy bandwidth; top-k floor = logits read once + indices written.
Times are triton.testing.do_bench medians (it flushes L2 before every repetition).
Every measured shape is spot-checked against a float64 reference on a few rows, on NaN-poisoned output.
Writes indexer_kernel.{csv,md,json} (and the config sweep, when asked) under --out.
"""

import argparse
import csv
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from fx_indexcache.kernels import topk as tk  # noqa: E402
from fx_indexcache.kernels.lightning_indexer import (  # noqa: E402
    LogitsConfig,
    _launch,
    default_config,
    indexer_logits,
    indexer_topk,
)

H, D, TOPK = 64, 128, 2048
SCALE = D**-0.5

PREFILL = [(1, S, T) for S in (1024, 2048, 4096) for T in (8192, 32768, 65536)]
DECODE = [(B, 1, T) for B in (1, 16, 64) for T in (8192, 32768, 65536)]

# Runs 1-2 (H100, 2026-11-27) swept 128x128/8w st2-4, 64x256/8w st2-5, 64x128/4w st3-5, 128x64/8w, 64x64/4w
# (prefill), decode block_t 32-256 / 4-8 warps / 1-8 queries a program, and the small-S crossover; the
# defaults in lightning_indexer.default_config come from them. This sweep re-times the two best prefill configs.
SWEEP_CONFIGS_PREFILL = [
    LogitsConfig("prefill", 64, 256, 8, 4),
    LogitsConfig("prefill", 64, 128, 4, 4),
]
SWEEP_SHAPES_PREFILL = [(1, 1024, 32768), (1, 2048, 65536), (1, 4096, 8192)]
SWEEP_CONFIGS_DECODE = []
SWEEP_SHAPES_DECODE = []
SWEEP_SHAPES_SMALL_S = []
SWEEP_CONFIGS_SMALL_S = []
# (rows, T, num_warps) for the Triton row top-k. Run 3 also timed a chunked radix variant (tl.histogram,
# any row length): 1.3-1.5x slower than torch.topk, dropped (docs/notes/indexer_kernel.md).
SWEEP_TOPK = [(1024, 8192, 8), (1024, 8192, 16), (1024, 32768, 16), (64, 32768, 16), (1, 32768, 16)]


def bench(fn, warmup=25, rep=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def make_inputs(B, S, T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, S, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, T, D, device="cuda", generator=g).bfloat16()
    w = (torch.randn(B, S, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    return q, k, w


def visible_pairs(B, S, T):
    # causal, queries are the last S positions: row s sees T - S + s + 1 keys (clamped to [0, T])
    return B * sum(max(0, min(T, T - S + s + 1)) for s in range(S))


def floors(B, S, T, peak_tflops, bw_tbs):
    flops = 2.0 * H * D * visible_pairs(B, S, T)
    bytes_in = B * S * H * D * 2 + B * T * D * 2 + B * S * H * 2
    bytes_out = B * S * T * 4
    t_comp = flops / (peak_tflops * 1e12) * 1e3
    t_mem = (bytes_in + bytes_out) / (bw_tbs * 1e12) * 1e3
    t_topk = (bytes_out + B * S * min(TOPK, T) * 4) / (bw_tbs * 1e12) * 1e3
    return flops, t_comp, t_mem, t_topk


def spot_check(q, k, w, out, rows):
    """Max relative error over a few rows against a float64 reference; also checks the -inf mask."""
    B, S, T = out.shape
    worst = 0.0
    for b in range(B):
        kb = k[b].double()
        for s in rows:
            sc = torch.relu((q[b, s].double() @ kb.T) * SCALE)  # [H, T]
            ref = (w[b, s].double()[:, None] * sc).sum(0)
            vis = torch.arange(T, device=out.device) <= s + T - S
            ref = torch.where(vis, ref, torch.full_like(ref, float("-inf")))
            got = out[b, s].double()
            if not torch.equal(torch.isneginf(got), torch.isneginf(ref)):
                return float("inf")
            fin = torch.isfinite(ref)
            if fin.any():
                e = ((got[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-300)).item()
                worst = max(worst, e)
        if b >= 2:
            break
    return worst


def hf_style_indexer(q, k, w, mask, scale: float, topk: int):
    """transformers-style DeepSeek-V3.2 indexer scoring + top-k (what Inductor gets to compile)."""
    scores = torch.einsum("bshd,btd->bsht", q, k) * scale
    scores = torch.relu(scores)
    index_scores = torch.einsum("bsht,bsh->bst", scores, w)
    index_scores = index_scores + mask
    return index_scores.topk(min(topk, index_scores.shape[-1]), dim=-1).indices.to(torch.int32)


def causal_mask(S, T):
    s = torch.arange(S, device="cuda").view(S, 1)
    t = torch.arange(T, device="cuda").view(1, T)
    m = torch.zeros(S, T, device="cuda")
    return m.masked_fill_(t > s + (T - S), float("-inf")).view(1, S, T)


def measure_ceilings():
    n = 8192
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(n, n, device="cuda", generator=g).bfloat16()
    b = torch.randn(n, n, device="cuda", generator=g).bfloat16()
    t_mm = bench(lambda: torch.mm(a, b))
    peak = 2 * n**3 / (t_mm * 1e-3) / 1e12
    del a, b
    x = torch.randn(1 << 28, device="cuda", generator=g)  # 1 GiB
    y = torch.empty_like(x)
    t_cp = bench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / (t_cp * 1e-3) / 1e12
    del x, y
    torch.cuda.empty_cache()
    return peak, bw, t_mm, t_cp


def kernel_info(q, k, w, out, cfg):
    h = _launch(q, k, w, out, True, SCALE, None, cfg)
    info = {}
    for key in ("n_regs", "n_spills"):
        info[key] = getattr(h, key, None)
    md = getattr(h, "metadata", None)
    info["shared"] = getattr(md, "shared", None) if md is not None else None
    try:
        ptx = h.asm.get("ptx", "")
        info["wgmma"] = "wgmma" in ptx
        info["mma_sync"] = "mma.sync" in ptx
    except Exception:
        pass
    return info


def run_sweep(shapes, configs, rows, log, deadline):
    for (B, S, T) in shapes:
        q, k, w = make_inputs(B, S, T, seed=B * 7 + S)
        out = torch.empty(B, S, T, device="cuda")
        for cfg in configs:
            if time.time() > deadline:
                log(f"sweep: budget spent, stopping at {cfg.name()} {B}x{S}x{T}")
                return
            try:
                out.fill_(float("nan"))
                info = kernel_info(q, k, w, out, cfg)
                torch.cuda.synchronize()
                unwritten = bool(out.isnan().any())
                err = spot_check(q, k, w, out, sorted({0, S // 2, S - 1}))
                ms = bench(lambda: _launch(q, k, w, out, True, SCALE, None, cfg))
            except Exception as e:  # a config that does not compile is reported, not fatal
                log(f"sweep {B}x{S}x{T} {cfg.name()}: FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append(dict(B=B, S=S, T=T, config=cfg.name(), ms=ms, rel_err=err, unwritten=unwritten, **info))
            log(f"sweep {B}x{S}x{T} {cfg.name():28s} {ms:8.4f} ms  err {err:.1e}  unwritten {unwritten}  {info}")
        del q, k, w, out
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--sweep", action="store_true", help="time every candidate launch config first")
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip optional work past this many seconds")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    deadline = t_start + args.budget_s
    log_f = open(os.path.join(args.out, "indexer_kernel_log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_properties(0)
    env = dict(card=dev.name, sms=dev.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, python=platform.python_version(),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    log(f"env: {env}")
    peak, bw, t_mm, t_cp = measure_ceilings()
    env.update(bf16_tflops=round(peak, 1), copy_tbs=round(bw, 3))
    log(f"ceilings: bf16 mm 8192^3 {t_mm:.3f} ms = {peak:.1f} TFLOP/s; copy 1 GiB {t_cp:.3f} ms = {bw:.3f} TB/s (r+w)")

    sweep_rows = []
    if args.sweep:
        sweep_deadline = t_start + args.budget_s * 0.4
        run_sweep(SWEEP_SHAPES_PREFILL, SWEEP_CONFIGS_PREFILL, sweep_rows, log, sweep_deadline)
        run_sweep(SWEEP_SHAPES_DECODE, SWEEP_CONFIGS_DECODE, sweep_rows, log, sweep_deadline)
        run_sweep(SWEEP_SHAPES_SMALL_S, SWEEP_CONFIGS_SMALL_S, sweep_rows, log, sweep_deadline)
        for (R, T, nw) in SWEEP_TOPK:
            if time.time() > sweep_deadline + 60:
                log("top-k sweep: budget spent")
                break
            g = torch.Generator(device="cuda").manual_seed(R + T)
            x = torch.randn(R, T, device="cuda", generator=g)
            o = torch.full((R, TOPK), -1, dtype=torch.int32, device="cuda")

            def fn():
                return tk._launch(x, o, TOPK, nw)

            h = fn()
            ok = torch.equal(torch.gather(x, 1, o.long()).sort(-1, descending=True).values,
                             torch.topk(x, TOPK, dim=-1).values)
            ms = bench(fn)
            ms_torch = bench(lambda: torch.topk(x, TOPK, dim=-1, sorted=False))
            name = f"row_topk-w{nw}"
            sweep_rows.append(dict(B=R, S=1, T=T, config=name, ms=ms, rel_err=0.0 if ok else 1.0,
                                   unwritten=False, n_regs=getattr(h, "n_regs", None),
                                   n_spills=getattr(h, "n_spills", None), torch_topk_unsorted_ms=ms_torch))
            log(f"sweep topk rows {R}x{T} {name}: triton {ms:.4f} ms (exact {ok}, regs {getattr(h, 'n_regs', None)},"
                f" spills {getattr(h, 'n_spills', None)}) torch.topk unsorted {ms_torch:.4f} ms")
            del x, o
        with open(os.path.join(args.out, "indexer_kernel_sweep.csv"), "w", newline="") as f:
            keys = sorted({k for r in sweep_rows for k in r})
            wr = csv.DictWriter(f, fieldnames=keys)
            wr.writeheader()
            wr.writerows(sweep_rows)

    for knob in ("cache_size_limit", "recompile_limit"):
        try:
            setattr(torch._dynamo.config, knob, 64)
        except Exception:
            pass
    compiled = torch.compile(hf_style_indexer, dynamic=False)

    shapes = PREFILL + DECODE
    if args.quick:
        shapes = [(1, 1024, 8192), (1, 1024, 32768), (16, 1, 32768)]
    free_bytes = torch.cuda.mem_get_info()[0]
    rows = []
    for (B, S, T) in shapes:
        q, k, w = make_inputs(B, S, T, seed=S + T + B)
        cfg = default_config(B, S, T, H, D, q.device)
        out = torch.full((B, S, T), float("nan"), device="cuda")
        indexer_logits(q, k, w, scale=SCALE, out=out)
        torch.cuda.synchronize()
        unwritten = bool(out.isnan().any())
        err = spot_check(q, k, w, out, sorted({r for r in (0, 1, S // 3, S // 2, S - 1) if r < S}))
        t_logits = bench(lambda: indexer_logits(q, k, w, scale=SCALE, out=out))
        t_topk = bench(lambda: indexer_topk(out, TOPK, method="torch"))
        t_topk_uns = bench(lambda: indexer_topk(out, TOPK, sorted=False, method="torch"))
        t_tk = t_tk_uns = None
        tk_exact = None
        if tk.supported(out, min(TOPK, T)):
            t_tk = bench(lambda: indexer_topk(out, TOPK, method="triton"))
            t_tk_uns = bench(lambda: indexer_topk(out, TOPK, sorted=False, method="triton"))
            kk = min(TOPK, T)
            tk_exact = torch.equal(torch.gather(out, -1, indexer_topk(out, TOPK, method="triton").long()),
                                   torch.topk(out, kk, dim=-1).values)
        t_fused = bench(lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK))
        t_fused_uns = bench(lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK, sorted=False))
        t_graph = None
        if S <= 8:  # launch-bound sizes: also time CUDA-graph replays (no L2 flush there)
            try:
                from triton.testing import do_bench_cudagraph

                t_graph = do_bench_cudagraph(lambda: indexer_logits(q, k, w, scale=SCALE, out=out), rep=50,
                                             return_mode="median")
            except Exception as e:
                log(f"cudagraph timing failed: {type(e).__name__}: {str(e)[:120]}")
        flops, f_comp, f_mem, f_topk = floors(B, S, T, peak, bw)
        floor = max(f_comp, f_mem)
        row = dict(B=B, S=S, T=T, H=H, D=D, topk=TOPK, config=cfg.name(), logits_ms=t_logits,
                   logits_graph_ms=t_graph, topk_sorted_ms=t_topk, topk_unsorted_ms=t_topk_uns,
                   topk_triton_sorted_ms=t_tk, topk_triton_unsorted_ms=t_tk_uns, topk_triton_exact=tk_exact,
                   fused_ms=t_fused, fused_unsorted_ms=t_fused_uns,
                   floor_compute_ms=f_comp, floor_memory_ms=f_mem, floor_ms=floor,
                   pct_roofline=100.0 * floor / t_logits, tflops=flops / (t_logits * 1e-3) / 1e12,
                   topk_floor_ms=f_topk, rel_err=err, unwritten=unwritten,
                   inductor_ms=None, speedup_vs_inductor=None, inductor_note="")
        inter = B * S * H * T * 6  # bf16 [B,S,H,T] einsum output + fp32 relu/weight intermediate
        if args.no_inductor:
            row["inductor_note"] = "not run"
        elif inter > 0.5 * free_bytes:
            row["inductor_note"] = f"skipped: [B,S,H,T] intermediates ~{inter / 2**30:.0f} GiB"
        elif time.time() > deadline:
            row["inductor_note"] = "skipped: time budget"
        else:
            try:
                mask = causal_mask(S, T)
                idx_ind = compiled(q, k, w, mask, SCALE, TOPK)
                torch.cuda.synchronize()
                t_ind = bench(lambda: compiled(q, k, w, mask, SCALE, TOPK), warmup=5, rep=50)
                row["inductor_ms"] = t_ind
                row["speedup_vs_inductor"] = t_ind / t_fused
                # same selection up to near-ties: compare the kernel's scores at both index sets
                ours = torch.gather(out, -1, indexer_topk(out, TOPK).long()).sort(-1).values
                theirs = torch.gather(out, -1, idx_ind.long()).sort(-1).values
                fin = torch.isfinite(ours) & torch.isfinite(theirs)
                row["inductor_score_gap"] = (ours[fin] - theirs[fin]).abs().max().item() if fin.any() else 0.0
                del mask, idx_ind
            except torch.OutOfMemoryError:
                row["inductor_note"] = "OOM"
            except Exception as e:
                row["inductor_note"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        log(f"{B}x{S}x{T} [{cfg.name()}] logits {t_logits:.4f} ms (floor {floor:.4f}, {row['pct_roofline']:.1f}% roofline,"
            f" {row['tflops']:.0f} TFLOP/s) topk torch {t_topk:.4f}/{t_topk_uns:.4f} triton {t_tk}/{t_tk_uns} exact {tk_exact}"
            f" fused {t_fused:.4f}/{t_fused_uns:.4f} ms"
            f" inductor {row['inductor_ms']} {row['inductor_note']} err {err:.1e} unwritten {unwritten}")
        del q, k, w, out
        torch.cuda.empty_cache()

    # ---- outputs
    with open(os.path.join(args.out, "indexer_kernel.csv"), "w", newline="") as f:
        keys = list(rows[0].keys()) + sorted({k for r in rows for k in r} - set(rows[0].keys()))
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)

    def fmt(x, nd=3):
        return "—" if x is None else f"{x:.{nd}f}"

    lines = [
        "# Lightning-indexer kernel benchmark",
        "",
        f"card {env['card']} ({env['sms']} SMs), torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, "
        f"{env['date']}; measured bf16 mm {env['bf16_tflops']} TFLOP/s, copy {env['copy_tbs']} TB/s (read+write).",
        f"H={H}, D={D}, top-k {TOPK}, causal (queries are the last S of T), bf16 q/k/w, fp32 logits. "
        "Times: do_bench medians, ms. Floor = max(compute, memory) of the logits; % roofline = floor / logits time.",
        "",
        "| B×S×T | config | logits | logits (graph) | floor | % roofline | TFLOP/s | torch.topk sorted / unsorted |"
        " Triton top-k sorted / unsorted | fused sorted / unsorted | Inductor (transformers code) |"
        " speedup (fused sorted) | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ind = fmt(r["inductor_ms"]) if r["inductor_ms"] is not None else r["inductor_note"]
        lines.append(
            f"| {r['B']}×{r['S']}×{r['T']} | {r['config']} | {fmt(r['logits_ms'])} | {fmt(r['logits_graph_ms'])} | "
            f"{fmt(r['floor_ms'])} | "
            f"{r['pct_roofline']:.1f} | {r['tflops']:.0f} | {fmt(r['topk_sorted_ms'])} / {fmt(r['topk_unsorted_ms'])} | "
            f"{fmt(r['topk_triton_sorted_ms'])} / {fmt(r['topk_triton_unsorted_ms'])} | "
            f"{fmt(r['fused_ms'])} / {fmt(r['fused_unsorted_ms'])} | {ind} | {fmt(r['speedup_vs_inductor'], 1) if r['speedup_vs_inductor'] else '—'} | "
            f"{r['rel_err']:.1e} |")
    if sweep_rows:
        lines += ["", "## Config sweep (logits kernel only)", "", "| B×S×T | config | ms | regs | spills | smem | wgmma |",
                  "|---|---|---|---|---|---|---|"]
        for r in sweep_rows:
            lines.append(f"| {r['B']}×{r['S']}×{r['T']} | {r['config']} | {r['ms']:.4f} | {r.get('n_regs')} | "
                         f"{r.get('n_spills')} | {r.get('shared')} | {r.get('wgmma')} |"
                         + (f" torch.topk unsorted {r['torch_topk_unsorted_ms']:.4f} ms" if r.get('torch_topk_unsorted_ms') else ""))
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "indexer_kernel.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "indexer_kernel.json"), "w") as f:
        json.dump(dict(env=env, rows=rows, sweep=sweep_rows), f, indent=1, default=str)
    print(md)
    log(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
