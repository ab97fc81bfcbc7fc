"""Our indexer logits (bf16, fp8) and top-k beside DeepGEMM's fp8 MQA logits kernels, on the same inputs.

DeepGEMM (github.com/deepseek-ai/DeepGEMM) is what the serving engines run for V3.2's indexer on Hopper: e4m3
keys with a per-token scale, q in e4m3. It is not a dependency: build it from its public source on the GPU
machine (``scripts/build_deepgemm.sh`` says how, with the system compiler) and put it on ``PYTHONPATH``; where it
does not import, the table has our columns only and its DeepGEMM columns say why they are empty.

Per shape (V3.2: 64 heads x 128, top-k 2048; keys of unequal size, each scaled by 2^U{-4..4}):

* both fp8 kernels read the same operands, ``quantize_operands``'s (e4m3 q per token and head, k per token, the
  q scales folded into the weights), quantised beforehand as an fp8 key cache holds them;
* prefill ``S x T``, the queries the last S of T keys (causal): ``fp8_fp4_mqa_logits`` (``ks = 0``,
  ``ke = T - S + i + 1``) against ``indexer_logits`` (bf16) and ``logits_from_fp8`` (our fp8 kernel);
* decode ``B x 1 x T``: ``fp8_fp4_paged_mqa_logits`` (blocks of 64 keys in a shuffled block table, the
  scheduling metadata made once) against ``indexer_logits`` and our fp8 decode kernels, on contiguous keys and
  on pages of 64 keys in a shuffled block table (``paged_decode``);
* each logits kernel alone and followed by our top-k (unsorted), timed by CUDA-graph replay
  (``triton.testing.do_bench_cudagraph`` medians); agreement of each fp8 top-k set with the bf16 one
  (mean |set & bf16 set| / k) and the logits' relative difference.
* the fused score + top-k column (issue 28 item 2: ``indexer_topk_fused``, no logits written, bf16, unsorted).

The table names the card, driver, torch, CUDA, Triton, DeepGEMM and the commit (``bench_environment``).
Writes ``<out>/deepgemm.{json,md}`` (the json: one record per shape, each with the machine's description) and
``<out>/results_rows.csv``, the run's figures as rows of the project's results table: merge them with
``python scripts/results_tables.py --add <out>/results_rows.csv``.
Usage: ``python benchmarks/bench_deepgemm.py --out DIR [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fx_indexcache.fuse.kernels import fused_score_topk as fz  # noqa: E402
from fx_indexcache.fuse.kernels import indexer_fp8 as f8  # noqa: E402
from fx_indexcache.fuse.kernels import lightning_indexer as li  # noqa: E402
from fx_indexcache.fuse.kernels import paged_decode as pd  # noqa: E402

from bench_environment import describe_machine, graph_replay_us, write_result_rows  # noqa: E402
from bench_indexer_fp8 import D, H, TOPK, _agreement, _inputs, paged_pool  # noqa: E402  (V3.2's shapes, unequal keys)

BLOCK_KV = 64
SHAPES = [("prefill", 1, 1024, 32768), ("prefill", 1, 1024, 131072), ("decode", 1, 1, 32768),
          ("decode", 64, 1, 32768), ("decode", 4, 1, 131072)]


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    seen = torch.isfinite(a) & torch.isfinite(b)
    return ((a[seen] - b[seen]).norm() / b[seen].norm()).item()


def prefill_logits(dg, ops: f8.Fp8Operands):
    """DeepGEMM's non-paged kernel for one sequence on our fp8 operands (q8 [S, H, D], k8 [T, D] with its per-token
    scales, the q scales and score scale folded into the weights), causal through ks / ke."""
    S, T = ops.q8.shape[1], ops.k8.shape[1]
    ks = torch.zeros(S, dtype=torch.int32, device="cuda")
    ke = torch.arange(T - S + 1, T + 1, dtype=torch.int32, device="cuda")
    args = ((ops.q8[0], None), (ops.k8[0], ops.k_scale[0]), ops.weights[0].contiguous(), ks, ke)
    return lambda: dg.fp8_fp4_mqa_logits(*args, True, 0, torch.float32)


def paged_logits(dg, ops: f8.Fp8Operands):
    """DeepGEMM's paged decode kernel on our fp8 operands: each row's keys (and their scales) in blocks of
    BLOCK_KV at shuffled places of one pool."""
    B, T = ops.k8.shape[0], ops.k8.shape[1]
    nblk = T // BLOCK_KV
    pool = torch.empty(B * nblk, BLOCK_KV * (D + 4), dtype=torch.uint8, device="cuda")
    table = torch.randperm(B * nblk, device="cuda", dtype=torch.int32).view(B, nblk)
    blocks_k = ops.k8.reshape(B * nblk, BLOCK_KV * D).view(torch.uint8)
    blocks_s = ops.k_scale.contiguous().view(B * nblk, BLOCK_KV).view(torch.uint8)
    pool[table.view(-1).long()] = torch.cat([blocks_k, blocks_s], 1)
    pool = pool.view(B * nblk, BLOCK_KV, 1, D + 4)
    lens = torch.full((B, 1), T, dtype=torch.int32, device="cuda")
    meta = dg.get_paged_mqa_logits_metadata(lens, BLOCK_KV, dg.get_num_sms())
    weights = ops.weights.reshape(B, -1).contiguous()
    return lambda: dg.fp8_fp4_paged_mqa_logits((ops.q8, None), pool, weights, lens, table, meta, T, False,
                                               torch.float32)


def our_paged_logits(ops: f8.Fp8Operands):
    """Our paged fp8 decode kernel on the same operands: keys and their scales in pages of BLOCK_KV tokens at
    shuffled places of one pool (our layout: keys and scales in two pools, one block table)."""
    pool, scales, table, lens = paged_pool(ops.k8, ops.k_scale, BLOCK_KV)
    out = torch.empty(ops.k8.shape[0], 1, ops.k8.shape[1], device="cuda")
    return lambda: pd.paged_decode_logits(ops.q8, pool, ops.weights, table, lens, k_scale=scales, out=out)


def measure(dg, kind, B, S, T) -> dict:
    """One shape's row; ``dg`` None (DeepGEMM not importable): our kernels only."""
    q, k, w = _inputs(B, S, T)
    scale = D**-0.5
    out = torch.empty(B, S, T, device="cuda")
    ours = lambda: li.indexer_logits(q, k, w, causal=True, scale=scale, out=out)  # noqa: E731
    ops = f8.quantize_operands(q, k, w, scale)  # both fp8 kernels read the same operands
    ref = ours().clone()
    row = dict(kind=kind, B=B, S=S, T=T)
    pairs = {"bf16": ours}
    if dg is not None:
        theirs = (prefill_logits if kind == "prefill" else paged_logits)(dg, ops)
        got = theirs().view(B, S, T)
        row.update(dg_agreement=_agreement(got, ref, TOPK), dg_rel_diff=_rel_diff(got, ref))
        pairs["deepgemm_fp8"] = lambda: theirs().view(B, S, T)
    if kind == "prefill" or S == 1:  # decode: our fp8 decode kernel on contiguous keys (DeepGEMM's are paged)
        ours8 = f8.logits_from_fp8(ops, causal=True)
        row.update(ours_fp8_agreement=_agreement(ours8, ref, TOPK), ours_fp8_rel_diff=_rel_diff(ours8, ref))
        pairs["ours_fp8"] = lambda: f8.logits_from_fp8(ops, causal=True, out=out)
    if kind == "decode":
        paged = our_paged_logits(ops)
        row.update(ours_fp8_paged_agreement=_agreement(paged(), ref, TOPK))
        pairs["ours_fp8_paged"] = paged
    for name, fn in pairs.items():
        row[f"{name}_us"] = graph_replay_us(fn)
        row[f"{name}_topk_us"] = graph_replay_us(lambda fn=fn: li.indexer_topk(fn(), TOPK, sorted=False, method="triton"))
    row["fused_topk_us"] = graph_replay_us(lambda: fz.indexer_topk_fused(q, k, w, TOPK, causal=True, scale=scale))
    return row


def _table(rows, env) -> str:
    lines = [
        "# Our indexer beside DeepGEMM's fp8 MQA logits",
        "",
        f"{env['device']}, driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}, "
        f"DeepGEMM {env['deepgemm']}, commit {env['commit'][:12]}, {env['date']}; H={H}, D={D}, top-k {TOPK} "
        "(ours, unsorted), causal; CUDA-graph replay medians, µs. Agreement: mean |fp8 set & bf16 set| / k against "
        "our bf16 logits. Fused score + top-k: ``indexer_topk_fused`` (bf16, one kernel, no logits written). Our "
        "kernels launch with the card's measured configurations where its file in fuse/kernels/configs/ has them.",
        "",
        "| shape | bf16 (ours) | + top-k | fused score+top-k | fp8 DeepGEMM | + top-k | fp8 ours | + top-k "
        "| fp8 ours paged | + top-k | DeepGEMM agreement | ours fp8 agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} {r['B']}×{r['S']}×{r['T']} | error: {r['error']} |||||||||||")
            continue
        f = lambda key: f"{r[key]:.1f}" if key in r else "—"  # noqa: E731
        g = lambda key: f"{r[key]:.4f}" if key in r else "—"  # noqa: E731
        lines.append(
            f"| {r['kind']} {r['B']}×{r['S']}×{r['T']} | {f('bf16_us')} | {f('bf16_topk_us')} | "
            f"{f('fused_topk_us')} | "
            f"{f('deepgemm_fp8_us')} | "
            f"{f('deepgemm_fp8_topk_us')} | {f('ours_fp8_us')} | {f('ours_fp8_topk_us')} | "
            f"{f('ours_fp8_paged_us')} | {f('ours_fp8_paged_topk_us')} | {g('dg_agreement')} | "
            f"{g('ours_fp8_agreement')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for this run's files; nothing is written into the checkout unasked")
    parser.add_argument("--quick", action="store_true", help="the first prefill and decode shapes only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_deepgemm: needs a CUDA GPU")
        return 2
    try:
        import deep_gemm as dg
        deepgemm = getattr(dg, "__version__", "?")
    except ImportError as e:  # our columns still run; the DeepGEMM ones say why they are empty
        dg, deepgemm = None, f"not importable ({e}; build it as scripts/build_deepgemm.sh says)"
        print(f"bench_deepgemm: DeepGEMM {deepgemm}", flush=True)
    env = dict(describe_machine(), deepgemm=deepgemm)
    rows = []
    for kind, B, S, T in [SHAPES[0], SHAPES[2]] if args.quick else SHAPES:
        try:
            rows.append(measure(dg, kind, B, S, T))
        except Exception as e:  # keep the other shapes' numbers
            rows.append(dict(kind=kind, B=B, S=S, T=T, error=f"{type(e).__name__}: {e}"[:300]))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    records = [dict(env, **row, what="indexer logits (+ our top-k, unsorted) per kernel, µs, CUDA-graph replay",
                    heads=H, head_dim=D, topk=TOPK) for row in rows]
    (args.out / "deepgemm.json").write_text(json.dumps(dict(env=env, rows=rows, records=records), indent=1))
    table = _table(rows, env)
    (args.out / "deepgemm.md").write_text(table)
    print(table)
    written = write_result_rows(args.out / "results_rows.csv", "indexer_vs_deepgemm", env,
                                "benchmarks/bench_deepgemm.py", result_values(rows))
    print(f"{written} rows in {args.out / 'results_rows.csv'}; add them with "
          f"python scripts/results_tables.py --add {args.out / 'results_rows.csv'}")
    return 0


#: The table's timing columns: (the row's key, the results table's variant).
_TIMED = [("bf16_us", "ours_bf16_logits"), ("bf16_topk_us", "ours_bf16_logits_topk"),
          ("fused_topk_us", "ours_fused_score_topk"), ("deepgemm_fp8_us", "deepgemm_fp8_logits"),
          ("deepgemm_fp8_topk_us", "deepgemm_fp8_logits_topk"), ("ours_fp8_us", "ours_fp8_logits"),
          ("ours_fp8_topk_us", "ours_fp8_logits_topk"), ("ours_fp8_paged_us", "ours_fp8_paged_logits"),
          ("ours_fp8_paged_topk_us", "ours_fp8_paged_logits_topk")]


def result_values(rows: list[dict]) -> list[tuple]:
    """``(shape, variant, metric, value, unit)`` of every figure the rows hold (a shape that failed holds none)."""
    values = []
    for r in rows:
        shape = f"{r['kind']} {r['B']}×{r['S']}×{r['T']}"
        values += [(shape, variant, "us", r.get(key), "us") for key, variant in _TIMED]
        values += [(shape, "deepgemm_fp8", "set_agreement", r.get("dg_agreement"), "fraction"),
                   (shape, "ours_fp8", "set_agreement", r.get("ours_fp8_agreement"), "fraction")]
    return values


if __name__ == "__main__":
    sys.exit(main())
