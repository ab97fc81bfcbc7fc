"""fp8 vs bf16 indexer scoring on the GPU: speed of the logits and agreement of the selected sets.

V3.2's indexer (64 heads x 128, top-k 2048, causal, the queries are the last S of T keys), random bf16
inputs (keys of unequal size: each scaled by 2^U{-4..4}). Per shape:

* ``bf16``: ``indexer_logits`` (the exact fused kernel, the default);
* ``fp8 kernel``: the fp8 kernel on operands quantised beforehand -- what an engine with an fp8 indexer
  key cache pays per call (its keys are quantised once, when written);
* ``fp8 op``: ``indexer_logits_fp8`` as the pass runs it: quantise q and k (one Triton pass each), fold
  the scales into the weights, then the kernel;
* agreement: mean over query rows of |fp8 top-k set & bf16 top-k set| / k, and the relative norm
  difference of the logits.

Times are medians of ``triton.testing.do_bench``. Writes ``<out>/indexer_fp8.{md,json}``.
Usage: ``python benchmarks/bench_indexer_fp8.py [--out benchmarks/results] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fx_indexcache.fuse.kernels import indexer_fp8 as f8  # noqa: E402
from fx_indexcache.fuse.kernels import lightning_indexer as li  # noqa: E402

H, D, TOPK = 64, 128, 2048
SHAPES = [("prefill", 1, 1024, 32768), ("prefill", 1, 1024, 131072), ("decode", 16, 1, 32768)]


def _inputs(B, S, T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, S, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, T, D, device="cuda", generator=g)
    k = (k * torch.exp2(torch.randint(-4, 5, (B, T, 1), device="cuda", generator=g).float())).bfloat16()
    w = torch.randn(B, S, H, device="cuda", generator=g) * (H**-0.5)
    return q, k, w


def paged_pool(k, k_scale=None, page: int = 64, seed: int = 0):
    """Each row's keys ``k [B, T, D]`` (and fp8 scales ``[B, T]``) in pages of ``page`` tokens at shuffled places
    of one pool, as an engine's paged key cache holds them: ``(pool [P, page, D], scales [P, page] or None,
    block_table [B, T / page] int32, kv_lens [B] int32)`` for ``paged_decode_logits``."""
    B, T, D_ = k.shape
    blocks = T // page
    g = torch.Generator(device=k.device).manual_seed(seed)
    table = torch.randperm(B * blocks, device=k.device, dtype=torch.int32, generator=g).view(B, blocks)
    where = table.view(-1).long()
    pool = torch.empty(B * blocks, page, D_, dtype=k.dtype, device=k.device)
    pool[where] = k.reshape(B * blocks, page, D_)
    scales = None
    if k_scale is not None:
        scales = torch.empty(B * blocks, page, device=k.device)
        scales[where] = k_scale.reshape(B * blocks, page)
    return pool, scales, table, torch.full((B,), T, dtype=torch.int32, device=k.device)


def _ms(fn) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _agreement(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    rows = a.reshape(-1, a.shape[-1])
    other = b.reshape(-1, b.shape[-1])
    ia, ib = rows.topk(k, -1).indices, other.topk(k, -1).indices
    chosen = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, ia, True)
    return chosen.gather(-1, ib).float().sum(-1).mean().item() / k


def _flops(B, S, T) -> float:
    visible = B * sum(T - S + s + 1 for s in range(S))
    return 2.0 * H * D * visible


def measure(kind, B, S, T) -> dict:
    q, k, w = _inputs(B, S, T)
    scale = D**-0.5
    ops = f8.quantize_operands(q, k, w, scale)
    out = torch.empty((B, S, T), dtype=torch.float32, device="cuda")
    bf16 = li.indexer_logits(q, k, w, causal=True, scale=scale)
    fp8 = f8.indexer_logits_fp8(q, k, w, causal=True, scale=scale)
    seen = torch.isfinite(bf16)
    row = dict(kind=kind, B=B, S=S, T=T, H=H, D=D, k=TOPK,
               agreement=_agreement(bf16, fp8, TOPK),
               rel_diff=((fp8[seen] - bf16[seen]).norm() / bf16[seen].norm()).item())
    del bf16, fp8, seen
    row["bf16_ms"] = _ms(lambda: li.indexer_logits(q, k, w, causal=True, scale=scale, out=out))
    row["fp8_kernel_ms"] = _ms(lambda: f8.logits_from_fp8(ops, causal=True, out=out))
    row["fp8_op_ms"] = _ms(lambda: f8.indexer_logits_fp8(q, k, w, causal=True, scale=scale))
    row["quantize_ms"] = _ms(lambda: f8.quantize_operands(q, k, w, scale))
    flops = _flops(B, S, T)
    row["bf16_tflops"] = flops / row["bf16_ms"] / 1e9
    row["fp8_kernel_tflops"] = flops / row["fp8_kernel_ms"] / 1e9
    row["speedup_kernel"] = row["bf16_ms"] / row["fp8_kernel_ms"]
    row["speedup_op"] = row["bf16_ms"] / row["fp8_op_ms"]
    return row


def _table(rows, env) -> str:
    lines = [
        "# fp8 vs bf16 indexer logits",
        "",
        f"{env['device']}, torch {env['torch']}, Triton {env['triton']}; H={H}, D={D}, top-k {TOPK}, causal; "
        "medians of triton.testing.do_bench. `fp8 kernel`: operands quantised beforehand (an fp8 key cache); "
        "`fp8 op`: quantise q and k + kernel, as the pass runs it. Agreement: mean |fp8 set & bf16 set| / k.",
        "",
        "| shape (B×S×T) | bf16 ms | fp8 kernel ms | fp8 op ms | quantise ms | kernel speed-up | op speed-up "
        "| bf16 / fp8 TFLOP/s | agreement | rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['B']}×{r['S']}×{r['T']} | error: {r['error']} |||||||||")
            continue
        lines.append(
            f"| {r['B']}×{r['S']}×{r['T']} | {r['bf16_ms']:.3f} | {r['fp8_kernel_ms']:.3f} | {r['fp8_op_ms']:.3f} | "
            f"{r['quantize_ms']:.3f} | {r['speedup_kernel']:.2f}× | {r['speedup_op']:.2f}× | "
            f"{r['bf16_tflops']:.0f} / {r['fp8_kernel_tflops']:.0f} | {r['agreement']:.4f} | {r['rel_diff']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for this run's files; nothing is written into the checkout unasked")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    args = parser.parse_args()
    import triton

    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    shapes = [(k, b, min(s, 128), min(t, 4096)) for k, b, s, t in SHAPES] if args.quick else SHAPES
    rows = []
    for kind, B, S, T in shapes:
        started = time.time()
        try:
            rows.append(measure(kind, B, S, T))
        except Exception as e:  # keep the other shapes' numbers
            rows.append(dict(kind=kind, B=B, S=S, T=T, error=f"{type(e).__name__}: {e}"[:300]))
        print(json.dumps(rows[-1]), f"({time.time() - started:.1f} s)", flush=True)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "indexer_fp8.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    table = _table(rows, env)
    (args.out / "indexer_fp8.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
