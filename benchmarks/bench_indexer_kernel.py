"""Benchmark the fused lightning-indexer kernel against Inductor and the card's floors.

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python benchmarks/bench_indexer_kernel.py --out "$OUT" [--sections topk,prefill,decode,table]
        [--sweep] [--quick] [--budget-s 420]

Sections (each writes its rows as it goes; one failing section does not stop the others):
  * ``topk``: our top-k (``kernels/topk.py``: the CUDA kernel where it loads, and the Triton split kernels)
    against torch.topk on the kernel's own logits,
    sorted and unsorted, prefill rows up to 256K keys and decode batches, k = 2048 and others; exactness
    of the selected scores, the share of rows that took each kernel path, the read-once floor;
  * ``prefill``: logits + top-k against the logits roofline (the target: >= 65 % at S >= 1024, T >= 32K);
  * ``decode``: logits + top-k replayed in a CUDA graph (the target: <= 25 us at 1 x 32K, <= 0.25 ms at
    64 x 32K), with torch.topk for comparison;
  * ``splits``: the split-row top-k at several split counts a row (tunes ``topk.split_plan``);
  * ``table``: the per-shape table of runs 1-3 (logits, top-k, fused, Inductor-compiled transformers code).

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

from fx_indexcache.fuse.kernels import topk as tk  # noqa: E402
from fx_indexcache.fuse.kernels.lightning_indexer import (  # noqa: E402
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


TOPK_SHAPES = [  # (rows, T, k): prefill rows (R = S queries of one sequence) and decode batches
    (1024, 32768, 2048), (1024, 65536, 2048), (1024, 131072, 2048), (256, 262144, 2048), (4096, 8192, 2048),
    (1024, 32768, 512), (1, 32768, 2048), (16, 32768, 2048), (64, 32768, 2048), (4, 131072, 2048),
]
PREFILL_SHAPES = [(1, 1024, 32768), (1, 2048, 32768), (1, 1024, 65536), (1, 1024, 131072)]
DECODE_SHAPES = [(1, 32768), (16, 32768), (64, 32768), (4, 131072), (1, 131072), (64, 131072)]


class Log:
    """Prints and appends to ``indexer_kernel_log.txt``."""

    def __init__(self, out: str) -> None:
        self.f = open(os.path.join(out, "indexer_kernel_log.txt"), "a")

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def environment(log) -> dict:
    """The card, the versions and the measured ceilings every floor is computed from."""
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_properties(0)
    env = dict(card=dev.name, sms=dev.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, python=platform.python_version(),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    from fx_indexcache.fuse.kernels import topk_cuda

    reason = topk_cuda.unavailable_reason(torch.device("cuda"))
    env["topk_default"] = "cuda" if reason is None else f"Triton split (CUDA kernel unavailable: {reason[:200]})"
    log(f"env: {env}")
    peak, bw, t_mm, t_cp = measure_ceilings()
    env.update(bf16_tflops=round(peak, 1), copy_tbs=round(bw, 3))
    log(f"ceilings: bf16 mm 8192^3 {t_mm:.3f} ms = {peak:.1f} TFLOP/s; copy 1 GiB {t_cp:.3f} ms = {bw:.3f} TB/s (r+w)")
    return env


def causal_logits(B, S, T, seed=0):
    """The kernel's own logits for S queries at the end of T keys (realistic rows: -inf past the diagonal)."""
    q, k, w = make_inputs(B, S, T, seed=seed)
    return indexer_logits(q, k, w, scale=SCALE)


def topk_exact(x, idx, k) -> bool:
    """The selected scores equal torch.topk's (sorted both ways): the set differs at most at exact ties."""
    got = torch.gather(x, -1, idx.long()).sort(-1, descending=True).values
    return bool(torch.equal(got, torch.topk(x, k, dim=-1).values))


def path_shares(x2d, k) -> dict:
    out = torch.empty(x2d.shape[0], k, dtype=torch.int32, device=x2d.device)
    path = torch.full((x2d.shape[0],), -1, dtype=torch.int32, device=x2d.device)
    tk._launch(x2d, out, k, path=path)
    counts = torch.bincount(path.long(), minlength=4).tolist()
    return {name: c / x2d.shape[0] for name, c in zip(("direct", "candidates", "ties", "fallback"), counts)}


def section_topk(env, log, quick: bool) -> list[dict]:
    rows = []
    shapes = TOPK_SHAPES[:1] + TOPK_SHAPES[6:9] if quick else TOPK_SHAPES
    for R, T, k in shapes:
        x = causal_logits(1, R, T, seed=R + T) if R > 64 else causal_logits(R, 1, T, seed=R + T)
        x2d = x.reshape(-1, T)
        row = dict(R=R, T=T, k=k, floor_ms=(R * T * 4 + R * k * 4) / (env["copy_tbs"] * 1e12) * 1e3)
        out = torch.empty(R, k, dtype=torch.int32, device="cuda")
        variants = [
            ("torch_sorted", lambda: torch.topk(x2d, k, dim=-1, sorted=True)),
            ("torch_unsorted", lambda: torch.topk(x2d, k, dim=-1, sorted=False)),
            ("ours_sorted", lambda: tk.row_topk(x2d, k, sorted=True)),
            ("ours_unsorted", lambda: tk.row_topk(x2d, k, sorted=False)),
            ("triton_split_sorted", lambda: tk._launch(x2d, out, k, sorted=True, algorithm="split")),
            ("triton_split_unsorted", lambda: tk._launch(x2d, out, k, algorithm="split")),
            ("one_program_sorted", lambda: tk._launch(x2d, out, k, sorted=True, algorithm="one_program")),
            ("one_program_unsorted", lambda: tk._launch(x2d, out, k, algorithm="one_program")),
        ]
        if R <= 256:  # which sort wins for few rows decides ``rank_sort_wins``
            variants += [("sorted_bitonic", lambda: tk._launch(x2d, out, k, sorted=True, sort="bitonic", algorithm="split")),
                         ("sorted_rank", lambda: tk._launch(x2d, out, k, sorted=True, sort="rank", algorithm="split"))]
        for name, fn in variants:
            row[name + "_ms"] = bench(fn)
        row["exact_sorted"] = topk_exact(x2d, tk.row_topk(x2d, k, sorted=True), k)
        row["exact_unsorted"] = topk_exact(x2d, tk.row_topk(x2d, k, sorted=False), k)
        for sort in ("bitonic", "rank") if R <= 256 else ():
            tk._launch(x2d, out, k, sorted=True, sort=sort, algorithm="split")
            row["exact_sorted"] &= topk_exact(x2d, out, k)
        row.update(path_shares(x2d, k))
        row["splits"] = tk.split_plan(R, T)["NSPLIT"]
        row["speedup_sorted"] = row["torch_sorted_ms"] / row["ours_sorted_ms"]
        row["speedup_unsorted"] = row["torch_unsorted_ms"] / row["ours_unsorted_ms"]
        rows.append(row)
        log(f"topk {R}x{T} k={k} ({row['splits']} splits): torch {row['torch_sorted_ms']:.4f}/{row['torch_unsorted_ms']:.4f}"
            f" ours {row['ours_sorted_ms']:.4f}/{row['ours_unsorted_ms']:.4f} Triton split "
            f"{row['triton_split_sorted_ms']:.4f}/{row['triton_split_unsorted_ms']:.4f} run-4 kernel "
            f"{row['one_program_sorted_ms']:.4f}/{row['one_program_unsorted_ms']:.4f} bitonic/rank sort "
            f"{row.get('sorted_bitonic_ms')}/{row.get('sorted_rank_ms')} ms (sorted/unsorted), floor "
            f"{row['floor_ms']:.4f}, exact {row['exact_sorted']}/{row['exact_unsorted']}, paths "
            f"{ {n: round(row[n], 3) for n in ('direct', 'candidates', 'ties', 'fallback')} }")
        del x, x2d, out
        torch.cuda.empty_cache()
    return rows


SPLIT_SWEEP = [  # (rows, T, split counts): what ``topk.split_plan``'s TARGET_PROGRAMS is tuned from
    (1024, 32768, (1, 2, 4)), (256, 262144, (1, 2, 4, 8)), (64, 32768, (4, 8, 16, 32)), (1, 32768, (8, 16, 32)),
    (4, 131072, (16, 64, 128)),
]


def section_splits(env, log, quick: bool) -> list[dict]:
    """Unsorted Triton split-algorithm top-k (k = 2048) at several split counts a row (the plan's choice marked)."""
    rows = []
    for R, T, counts in SPLIT_SWEEP[2:4] if quick else SPLIT_SWEEP:
        x2d = (causal_logits(1, R, T, seed=R + T) if R > 64 else causal_logits(R, 1, T, seed=R + T)).reshape(-1, T)
        out = torch.empty(R, TOPK, dtype=torch.int32, device="cuda")
        chosen = tk.split_plan(R, T)["NSPLIT"]
        for n in counts:
            ms = bench(lambda: tk._launch(x2d, out, TOPK, splits=n, algorithm="split"))
            exact = topk_exact(x2d, out, TOPK)
            rows.append(dict(R=R, T=T, splits=tk.split_plan(R, T, n)["NSPLIT"], ms=ms, exact=exact, plan=n == chosen))
            log(f"splits {R}x{T}: {n} splits {ms:.4f} ms exact {exact}{' (plan)' if n == chosen else ''}")
        del x2d, out
        torch.cuda.empty_cache()
    return rows


def section_prefill(env, log, quick: bool) -> list[dict]:
    rows = []
    for B, S, T in PREFILL_SHAPES[:1] if quick else PREFILL_SHAPES:
        q, k, w = make_inputs(B, S, T, seed=S + T)
        out = torch.empty(B, S, T, device="cuda")
        _, f_comp, f_mem, _ = floors(B, S, T, env["bf16_tflops"], env["copy_tbs"])
        floor = max(f_comp, f_mem)
        t_logits = bench(lambda: indexer_logits(q, k, w, scale=SCALE, out=out))
        t_sorted = bench(lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK, method="triton"))
        t_uns = bench(lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK, sorted=False,
                                           method="triton"))
        t_torch = bench(lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK, method="torch"))
        row = dict(B=B, S=S, T=T, logits_ms=t_logits, logits_floor_ms=floor, fused_sorted_ms=t_sorted,
                   fused_unsorted_ms=t_uns, fused_torch_topk_ms=t_torch,
                   pct_logits_roofline_sorted=100 * floor / t_sorted, pct_logits_roofline_unsorted=100 * floor / t_uns,
                   pct_logits_roofline_torch_topk=100 * floor / t_torch)
        rows.append(row)
        log(f"prefill {B}x{S}x{T}: logits {t_logits:.4f} (floor {floor:.4f}); logits+top-k sorted {t_sorted:.4f} "
            f"({row['pct_logits_roofline_sorted']:.0f}% of floor), unsorted {t_uns:.4f}, with torch.topk {t_torch:.4f}")
        del q, k, w, out
        torch.cuda.empty_cache()
    return rows


def graph_ms(fn, rep=50) -> float:
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def section_decode(env, log, quick: bool) -> list[dict]:
    rows = []
    for B, T in DECODE_SHAPES[:3] if quick else DECODE_SHAPES:
        q, k, w = make_inputs(B, 1, T, seed=B + T)
        out = torch.empty(B, 1, T, device="cuda")
        row = dict(B=B, T=T, k_read_floor_ms=B * T * D * 2 / (env["copy_tbs"] * 1e12) * 1e3)
        for name, fn in (
            ("logits", lambda: indexer_logits(q, k, w, scale=SCALE, out=out)),
            ("fused_sorted", lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK, method="triton")),
            ("fused_unsorted", lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK, sorted=False,
                                                    method="triton")),
            ("fused_torch_topk", lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK, method="torch")),
            ("fused_torch_topk_unsorted", lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK,
                                                               sorted=False, method="torch")),
        ):
            try:
                row[name + "_graph_ms"] = graph_ms(fn)
            except Exception as e:  # reported, not fatal
                row[name + "_graph_ms"] = None
                log(f"decode {B}x{T} {name}: graph timing failed: {type(e).__name__}: {str(e)[:160]}")
        rows.append(row)
        log(f"decode {B}x1x{T} (CUDA graph): logits {row['logits_graph_ms']} ms; logits+top-k sorted "
            f"{row['fused_sorted_graph_ms']} unsorted {row['fused_unsorted_graph_ms']} torch.topk {row['fused_torch_topk_graph_ms']}")
        del q, k, w, out
        torch.cuda.empty_cache()
    return rows


def fmt(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def markdown(env, sections: dict) -> str:
    lines = ["# Lightning-indexer kernel benchmark", "",
             f"card {env['card']} ({env['sms']} SMs), torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, "
             f"{env['date']}; measured bf16 mm {env['bf16_tflops']} TFLOP/s, copy {env['copy_tbs']} TB/s (read+write).",
             f"H={H}, D={D}, causal (queries are the last S of T), bf16 q/k/w, fp32 logits. "
             "Times: ms, do_bench medians (L2 flushed) unless marked 'CUDA graph'.", ""]
    if sections.get("topk"):
        lines += [f"## Top-k: ours (`row_topk`'s default here: {env.get('topk_default')}) and the Triton split kernels vs "
                  "torch.topk, on the kernel's own causal logits", "",
                  "| rows × T | k | splits | torch sorted / unsorted | ours sorted / unsorted | speed-up sorted / unsorted |"
                  " run-4 kernel sorted / unsorted | bitonic / rank sort | read-once floor | exact |"
                  " rows: candidates / ties / fallback / direct |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sections["topk"]:
            lines.append(f"| {r['R']}×{r['T']} | {r['k']} | {r['splits']} | {fmt(r['torch_sorted_ms'])} / "
                         f"{fmt(r['torch_unsorted_ms'])} | {fmt(r['ours_sorted_ms'])} / {fmt(r['ours_unsorted_ms'])} | "
                         f"{r['speedup_sorted']:.1f}× / {r['speedup_unsorted']:.1f}× | {fmt(r['one_program_sorted_ms'])} / "
                         f"{fmt(r['one_program_unsorted_ms'])} | {fmt(r.get('sorted_bitonic_ms'))} / "
                         f"{fmt(r.get('sorted_rank_ms'))} | {fmt(r['floor_ms'])} | {r['exact_sorted'] and r['exact_unsorted']} | "
                         f"{r['candidates']:.3f} / {r['ties']:.3f} / {r['fallback']:.3f} / {r['direct']:.3f} |")
        lines.append("")
    if sections.get("prefill"):
        lines += ["## Prefill: logits + top-k (k = 2048) against the logits roofline", "",
                  "| B×S×T | logits | logits floor | + our top-k sorted (% of floor) | + unsorted (%) | + torch.topk sorted (%) |",
                  "|---|---|---|---|---|---|"]
        for r in sections["prefill"]:
            lines.append(f"| {r['B']}×{r['S']}×{r['T']} | {fmt(r['logits_ms'])} | {fmt(r['logits_floor_ms'])} | "
                         f"{fmt(r['fused_sorted_ms'])} ({r['pct_logits_roofline_sorted']:.0f}) | "
                         f"{fmt(r['fused_unsorted_ms'])} ({r['pct_logits_roofline_unsorted']:.0f}) | "
                         f"{fmt(r['fused_torch_topk_ms'])} ({r['pct_logits_roofline_torch_topk']:.0f}) |")
        lines.append("")
    if sections.get("decode"):
        lines += ["## Decode (S = 1): logits + top-k (k = 2048) replayed in a CUDA graph", "",
                  "| B×T | logits | + our top-k sorted | + unsorted | + torch.topk sorted | + unsorted | k-read floor |",
                  "|---|---|---|---|---|---|---|"]
        for r in sections["decode"]:
            lines.append(f"| {r['B']}×{r['T']} | {fmt(r['logits_graph_ms'], 4)} | {fmt(r['fused_sorted_graph_ms'], 4)} | "
                         f"{fmt(r['fused_unsorted_graph_ms'], 4)} | {fmt(r['fused_torch_topk_graph_ms'], 4)} | "
                         f"{fmt(r.get('fused_torch_topk_unsorted_graph_ms'), 4)} | "
                         f"{fmt(r['k_read_floor_ms'], 4)} |")
        lines.append("")
    if sections.get("splits"):
        lines += ["## Split sweep: unsorted Triton top-k (k = 2048) by split count a row", "",
                  "| rows × T | splits | ms | exact | the plan's |", "|---|---|---|---|---|"]
        for r in sections["splits"]:
            lines.append(f"| {r['R']}×{r['T']} | {r['splits']} | {fmt(r['ms'], 4)} | {r['exact']} | {'yes' if r['plan'] else ''} |")
        lines.append("")
    if sections.get("table"):
        lines += table_markdown(sections["table"])
    if sections.get("sweep"):
        lines += ["", "## Config sweep (logits kernel only)", "", "| B×S×T | config | ms | regs | spills | smem | wgmma |",
                  "|---|---|---|---|---|---|---|"]
        for r in sections["sweep"]:
            lines.append(f"| {r['B']}×{r['S']}×{r['T']} | {r['config']} | {r['ms']:.4f} | {r.get('n_regs')} | "
                         f"{r.get('n_spills')} | {r.get('shared')} | {r.get('wgmma')} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str, env: dict, sections: dict) -> None:
    for name, rows in sections.items():
        if rows:
            with open(os.path.join(out, f"indexer_kernel_{name}.csv"), "w", newline="") as f:
                keys = list(rows[0].keys()) + sorted({k for r in rows for k in r} - set(rows[0].keys()))
                wr = csv.DictWriter(f, fieldnames=keys)
                wr.writeheader()
                wr.writerows(rows)
    with open(os.path.join(out, "indexer_kernel.json"), "w") as f:
        json.dump(dict(env=env, **sections), f, indent=1, default=str)
    with open(os.path.join(out, "indexer_kernel.md"), "w") as f:
        f.write(markdown(env, sections))


def section_table(env, log, args, deadline) -> list[dict]:
    """Runs 1-3's per-shape table: logits, top-k both ways, fused, and Inductor on transformers-style code."""
    for knob in ("cache_size_limit", "recompile_limit"):
        try:
            setattr(torch._dynamo.config, knob, 64)
        except Exception:
            pass
    compiled = torch.compile(hf_style_indexer, dynamic=False)
    shapes = [(1, 1024, 8192), (1, 1024, 32768), (16, 1, 32768)] if args.quick else PREFILL + DECODE
    rows = []
    for B, S, T in shapes:
        rows.append(table_row(env, log, compiled, B, S, T, args, deadline))
        torch.cuda.empty_cache()
    return rows


def table_row(env, log, compiled, B, S, T, args, deadline) -> dict:
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
    t_tk = bench(lambda: indexer_topk(out, TOPK, method="triton"))
    t_tk_uns = bench(lambda: indexer_topk(out, TOPK, sorted=False, method="triton"))
    tk_exact = topk_exact(out, indexer_topk(out, TOPK, method="triton"), min(TOPK, T))
    t_fused = bench(lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK))
    t_fused_uns = bench(lambda: indexer_topk(indexer_logits(q, k, w, scale=SCALE, out=out), TOPK, sorted=False))
    flops, f_comp, f_mem, f_topk = floors(B, S, T, env["bf16_tflops"], env["copy_tbs"])
    floor = max(f_comp, f_mem)
    row = dict(B=B, S=S, T=T, H=H, D=D, topk=TOPK, config=cfg.name(), logits_ms=t_logits,
               topk_sorted_ms=t_topk, topk_unsorted_ms=t_topk_uns,
               topk_triton_sorted_ms=t_tk, topk_triton_unsorted_ms=t_tk_uns, topk_triton_exact=tk_exact,
               fused_ms=t_fused, fused_unsorted_ms=t_fused_uns,
               floor_compute_ms=f_comp, floor_memory_ms=f_mem, floor_ms=floor,
               pct_roofline=100.0 * floor / t_logits, tflops=flops / (t_logits * 1e-3) / 1e12,
               topk_floor_ms=f_topk, rel_err=err, unwritten=unwritten,
               inductor_ms=None, speedup_vs_inductor=None, inductor_note="")
    inductor_row(row, compiled, q, k, w, out, args, deadline)
    log(f"{B}x{S}x{T} [{cfg.name()}] logits {t_logits:.4f} ms (floor {floor:.4f}, {row['pct_roofline']:.1f}% roofline,"
        f" {row['tflops']:.0f} TFLOP/s) topk torch {t_topk:.4f}/{t_topk_uns:.4f} triton {t_tk:.4f}/{t_tk_uns:.4f} exact {tk_exact}"
        f" fused {t_fused:.4f}/{t_fused_uns:.4f} ms inductor {row['inductor_ms']} {row['inductor_note']} err {err:.1e}")
    return row


def inductor_row(row, compiled, q, k, w, out, args, deadline) -> None:
    B, S, H_, D_ = q.shape
    T = k.shape[1]
    inter = B * S * H * T * 6  # bf16 [B,S,H,T] einsum output + fp32 relu/weight intermediate
    if args.no_inductor:
        row["inductor_note"] = "not run"
        return
    if inter > 0.5 * torch.cuda.mem_get_info()[0]:
        row["inductor_note"] = f"skipped: [B,S,H,T] intermediates ~{inter / 2**30:.0f} GiB"
        return
    if time.time() > deadline:
        row["inductor_note"] = "skipped: time budget"
        return
    try:
        mask = causal_mask(S, T)
        compiled(q, k, w, mask, SCALE, TOPK)
        torch.cuda.synchronize()
        row["inductor_ms"] = bench(lambda: compiled(q, k, w, mask, SCALE, TOPK), warmup=5, rep=50)
        row["speedup_vs_inductor"] = row["inductor_ms"] / row["fused_ms"]
    except torch.OutOfMemoryError:
        row["inductor_note"] = "OOM"
    except Exception as e:
        row["inductor_note"] = f"failed: {type(e).__name__}: {str(e)[:120]}"


def table_markdown(rows) -> list[str]:
    lines = ["## Per-shape table (logits, top-k, fused, Inductor-compiled transformers code)", "",
             "| B×S×T | config | logits | floor | % roofline | TFLOP/s | torch.topk sorted / unsorted |"
             " Triton top-k sorted / unsorted | fused sorted / unsorted | Inductor | speed-up | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ind = fmt(r["inductor_ms"]) if r["inductor_ms"] is not None else r["inductor_note"]
        lines.append(
            f"| {r['B']}×{r['S']}×{r['T']} | {r['config']} | {fmt(r['logits_ms'])} | {fmt(r['floor_ms'])} | "
            f"{r['pct_roofline']:.1f} | {r['tflops']:.0f} | {fmt(r['topk_sorted_ms'])} / {fmt(r['topk_unsorted_ms'])} | "
            f"{fmt(r['topk_triton_sorted_ms'])} / {fmt(r['topk_triton_unsorted_ms'])} | "
            f"{fmt(r['fused_ms'])} / {fmt(r['fused_unsorted_ms'])} | {ind} | "
            f"{fmt(r['speedup_vs_inductor'], 1) if r['speedup_vs_inductor'] else '—'} | {r['rel_err']:.1e} |")
    return lines


def section_sweep(log, deadline) -> list[dict]:
    rows = []
    run_sweep(SWEEP_SHAPES_PREFILL, SWEEP_CONFIGS_PREFILL, rows, log, deadline)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"), required="OUT" not in os.environ,
                    help="folder for this run's files (default $OUT); nothing is written into the checkout unasked")
    ap.add_argument("--sections", default="topk,prefill,decode,table", help="comma-separated, in order")
    ap.add_argument("--sweep", action="store_true", help="time the candidate logits launch configs first")
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip optional work past this many seconds")
    ap.add_argument("--quick", action="store_true", help="a few shapes per section")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    deadline = t_start + args.budget_s
    log = Log(args.out)
    env = environment(log)
    runners = {
        "topk": lambda: section_topk(env, log, args.quick),
        "prefill": lambda: section_prefill(env, log, args.quick),
        "decode": lambda: section_decode(env, log, args.quick),
        "splits": lambda: section_splits(env, log, args.quick),
        "table": lambda: section_table(env, log, args, deadline),
    }
    names = (["sweep"] if args.sweep else []) + [n for n in args.sections.split(",") if n]
    runners["sweep"] = lambda: section_sweep(log, t_start + args.budget_s * 0.4)
    sections = {}
    for name in names:
        if time.time() > deadline:
            log(f"section {name}: skipped, time budget spent")
            continue
        try:
            sections[name] = runners[name]()
        except Exception as e:  # keep the other sections
            import traceback

            log(f"section {name} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}")
        write_outputs(args.out, env, sections)
    print(markdown(env, sections))
    log(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
