"""The CUDA C++ top-k (``kernels/topk_cuda.cu``: its many-row and wide blocks) against the Triton split kernels
and torch.topk.

Run from the repository root on a CUDA machine::

    PYTHONPATH=.:tests python benchmarks/bench_topk_cuda.py --out "$OUT" [--sanitize]

First every path of the kernel is checked on representative rows (``tests/topk_cases.check``: the selected
set against torch.topk, the tie rule, the order; the share of rows each path took is printed). Then, k = 2048
on fresh randn rows: prefill shapes eagerly (do_bench medians, L2 flushed), decode shapes replayed in a CUDA
graph (do_bench_cudagraph medians), unsorted and sorted. ``--sanitize``: the checks only, on small rows, for a
run under ``compute-sanitizer`` (memcheck, racecheck); ``--checks``: every check case, no timings (a build variant
of the kernel, ``FX_INDEXCACHE_NVRTC_FLAGS``). (Run 8's ``topk_cuda_run8.json`` was timed by this
script's staging copy with do_bench's default, means, for the prefill rows; the script now takes the project's
``bench`` helper, medians.) ``--decode-sweep``: instead, decode logits + top-k
(1 and 64 x 32K) replayed in a CUDA graph for each launch variant of both kernels (warps, split counts, sample
sizes, the prefix skip). Writes topk_cuda.json (or decode_topk_sweep.json) under --out.
"""

import argparse
import itertools
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "tests")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

import topk_cases  # noqa: E402
from bench_indexer_kernel import bench, graph_ms  # noqa: E402

from fx_indexcache.fuse.kernels import topk as tk  # noqa: E402
from fx_indexcache.fuse.kernels import topk_cuda  # noqa: E402

K = 2048
#: (rows, T, k, plan options, row kind): every path (0 direct, 1 candidates, 2 threshold ties, 3 fallback),
#: one block a row and split rows, a tail that is not a multiple of 4.
SMALL_CASES = [(3, 700, 50, {}, "randn"), (4, 8192, 2048, dict(splits=1), "randn"), (1, 32768, 2048, {}, "randn"),
               (2, 65536, 40, dict(sample=64, cap=1024), "randn"), (4, 8192, 2048, dict(splits=1), "allmasked"),
               (2, 8192, 2048, dict(splits=1), "quantized"), (2, 8192, 2048, dict(splits=1), "off_sample"),
               (1, 32768, 40, dict(sample=8, cap=1024), "randn")]
CASES = SMALL_CASES + [
    (300, 8192, 2048, {}, "randn"), (300, 8192, 2048, {}, "ties"), (300, 8192, 2048, {}, "allmasked"),
    (64, 32768, 2048, {}, "masked"), (64, 32768, 2048, {}, "ties"), (1024, 32768, 2048, {}, "randn"),
    (300, 65536, 40, dict(sample=64, cap=1024), "randn"), (1, 131072, 2048, {}, "randn"),
    (4, 40000, 1000, dict(splits=5), "masked"), (300, 8192, 2048, {}, "quantized"), (1, 32768, 2048, {}, "quantized"),
    (64, 32768, 2048, {}, "off_sample"), (1, 32768, 2048, {}, "off_sample")]
PREFILL = [(1024, 32768), (1024, 131072), (4096, 8192), (256, 262144), (256, 32768), (512, 65536)]
DECODE = [(1, 32768), (4, 32768), (16, 32768), (64, 32768), (128, 32768), (1, 65536), (16, 65536), (1, 131072),
          (4, 131072), (16, 131072), (64, 131072), (1, 262144), (1, 8192), (64, 8192)]
#: The CUDA kernel's block shapes (and, on sm_90+, its cluster rows): every check runs on each.
CUDA_ALGORITHMS = ("cuda", "cuda_wide", "cuda_cluster")


def cuda_algorithms() -> tuple:
    """``CUDA_ALGORITHMS`` this card runs (clusters need compute capability 9.0)."""
    clusters = topk_cuda.cluster_reason(torch.device("cuda")) is None
    return tuple(a for a in CUDA_ALGORITHMS if a != "cuda_cluster" or clusters)


def check_cases(cases) -> int:
    g = torch.Generator(device="cuda").manual_seed(1)
    bad = 0
    for (R, T, k, opts, kind), alg, sorted_ in itertools.product(cases, cuda_algorithms() + ("binned",), (False, True)):
        if alg == "cuda_cluster":
            opts = {key: v for key, v in opts.items() if key != "splits"}  # a cluster cuts its rows itself
        if alg == "binned" and (opts.get("splits", 1) != 1 or tk.plan(T, k, cap=opts.get("cap"))["DIRECT"]):
            continue  # (bins go to one wide block a sampled row)
        where = f"{alg} {R}x{T} k={k} {opts} {kind} sorted={sorted_}"
        try:
            x = topk_cases.rows(kind, R, T, g, device="cuda")
            launch = dict(opts, algorithm=alg)
            if alg == "binned":  # the wide block, its threshold from the rows' counts (topk_cuda.row_bins)
                launch.update(algorithm="cuda_wide", bins=topk_cuda.row_bins(x))
            paths = topk_cases.check(x, k, sorted_, where, **launch)
            print("ok", where, torch.bincount(paths.long(), minlength=4).tolist(), flush=True)
        except AssertionError as e:
            bad += 1
            print("FAIL", where, str(e)[:400], flush=True)
    return bad


def variants(x, out, graph: bool) -> list:
    v = [(f"{alg}{'_sorted' if s else ''}", lambda alg=alg, s=s: tk._launch(x, out, K, sorted=s, algorithm=alg))
         for alg in cuda_algorithms() for s in (False, True)]
    v.append(("split", lambda: tk._launch(x, out, K, algorithm="split")))
    if graph:
        v.append(("split_prefix_skip", lambda: tk._launch(x, out, K, algorithm="split", tune={"prefix_skip": True})))
    else:
        v += [("split_sorted", lambda: tk._launch(x, out, K, sorted=True, algorithm="split")),
              ("torch_sorted", lambda: torch.topk(x, K, dim=-1, sorted=True))]
    return v + [("torch", lambda: torch.topk(x, K, dim=-1, sorted=False))]


def timings() -> list:
    res = []
    for shapes, graph in ((PREFILL, False), (DECODE, True)):
        for R, T in shapes:
            x = torch.randn(R, T, device="cuda")
            out = torch.empty(R, K, dtype=torch.int32, device="cuda")
            row = dict(R=R, T=T, graph=graph)
            for name, fn in variants(x, out, graph):
                row[name] = round(float(graph_ms(fn) if graph else bench(fn)), 4)
            print("decode graph ms" if graph else "prefill eager ms", row, flush=True)
            res.append(row)
    return res


#: (algorithm, launch options) of the decode sweep (run 8: none beat the default at 1 x 32K).
DECODE_VARIANTS = [
    ("split", {}), ("split", dict(tune={"filter_warps": 2})), ("split", dict(tune={"filter_warps": 8})),
    ("split", dict(tune={"select_warps": 4})), ("split", dict(tune={"select_warps": 16})), ("split", dict(splits=16)),
    ("split", dict(splits=64)), ("split", dict(tune={"prefix_skip": True})), ("split", dict(tune={"select_in_write": False})),
    ("split", dict(tune={"filter_warps": 2, "prefix_skip": True})), ("split", dict(splits=16, tune={"filter_warps": 2})),
    ("split", dict(sample=1024)), ("split", dict(sample=4096)),
    ("cuda", {}), ("cuda", dict(splits=16)), ("cuda", dict(splits=8)), ("cuda", dict(splits=64)), ("cuda_wide", {}),
    ("cuda_wide", dict(splits=4)), ("cuda_wide", dict(splits=8)), ("cuda_wide", dict(splits=16)), ("cuda_cluster", {})]


def decode_sweep() -> list:
    from bench_indexer_kernel import SCALE, make_inputs, topk_exact

    from fx_indexcache.fuse.kernels.lightning_indexer import indexer_logits

    res, runnable = [], cuda_algorithms()
    for B in (1, 64):
        q, k, w = make_inputs(B, 1, 32768, seed=B)
        logits = torch.empty(B, 1, 32768, device="cuda")
        out = torch.empty(B, K, dtype=torch.int32, device="cuda")
        for alg, opts in DECODE_VARIANTS:
            if B > 1 and alg == "split" and "splits" in opts:  # more programs than the default's 1024
                continue
            if alg in CUDA_ALGORITHMS and alg not in runnable:  # (the cluster rows without clusters)
                continue

            def fn():
                indexer_logits(q, k, w, scale=SCALE, out=logits)
                tk._launch(logits.view(B, -1), out, K, algorithm=alg, **opts)

            ms = graph_ms(fn, rep=100)
            row = dict(B=B, algorithm=alg, opts=str(opts), fused_ms=round(ms, 4), exact=topk_exact(logits.view(B, -1), out, K))
            print(row, flush=True)
            res.append(row)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"), required="OUT" not in os.environ,
                    help="folder for this run's files (default $OUT); nothing is written into the checkout unasked")
    ap.add_argument("--sanitize", action="store_true", help="the small checks only (for compute-sanitizer)")
    ap.add_argument("--checks", action="store_true", help="every check case, no timings (a build variant's exactness)")
    ap.add_argument("--decode-sweep", action="store_true", help="decode logits + top-k for each launch variant")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    reason = topk_cuda.unavailable_reason(torch.device("cuda"))
    print("CUDA top-k:", reason or "loaded", "| NVRTC flags:", os.environ.get("FX_INDEXCACHE_NVRTC_FLAGS", ""), flush=True)
    if reason:
        sys.exit(1)
    if args.decode_sweep:
        with open(os.path.join(args.out, "decode_topk_sweep.json"), "w") as f:
            json.dump(decode_sweep(), f, indent=1)
        return
    bad = check_cases(SMALL_CASES if args.sanitize else CASES)
    if args.sanitize or args.checks:
        print(f"{bad} failing checks", flush=True)
        sys.exit(1 if bad else 0)
    import triton

    props = torch.cuda.get_device_properties(0)
    env = dict(card=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S UTC"),
               kernels={n: k.attributes() for n, k in topk_cuda._kernels(torch.cuda.current_device()).items()},
               note="do_bench medians (L2 flushed) for prefill rows, do_bench_cudagraph medians for decode; "
                    "randn rows, k=2048")
    with open(os.path.join(args.out, "topk_cuda.json"), "w") as f:
        json.dump(dict(env=env, failures=bad, results=timings()), f, indent=1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
