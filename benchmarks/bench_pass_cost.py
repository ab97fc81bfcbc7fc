"""What IndexCachePass costs at compile time, against the whole torch.compile (issue 5), on the CPU.

    PYTHONPATH=. python benchmarks/bench_pass_cost.py [--layers 8,16,32,61] [--full-layers 8,16] [--out benchmarks/results]

Graphs: the reference model with DeepSeek-V3.2's structure (``DSAModelConfig.deepseek_v32(num_layers=N,
moe=True)``: 3 dense-MLP layers then MoE layers with the group-limited router -- 3 router top-k per MoE
layer besides the indexer's top-k, MLA, indexer with non-interleaved RoPE) but small sizes (hidden 64,
4 heads, indexer 8x32, top-k 16, 16 experts in 8 groups) so that a CPU compile is affordable. The pass
works on the graph's structure (nodes, users, module stacks), so its cost depends on the node count,
not on the tensor sizes; Inductor's codegen cost depends on both (C++ here, Triton on a GPU).

Per N, each in a fresh subprocess with its own Inductor cache directory (no cache hits), static shapes,
input [1, 64] tokens, freq 4 (offset 2, vLLM's default):
  * ``pass``: indexcache_backend, IndexCachePass.run timed with time.perf_counter around it on the
    real post-grad graph, then the compile is aborted (so N=61 needs no C++ codegen); also reports the
    post-grad graph's node count and the time from the call to the pass (Dynamo + AOT + Inductor's
    own pre/post-grad passes);
  * ``full``: the whole compile with the pass (first call's wall time), and the pass's own time in it;
  * ``plain``: the whole compile with plain Inductor (no pass).
Writes pass_cost.csv and pass_cost.md under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SMALL = dict(
    vocab_size=512, hidden_size=64, num_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
    qk_nope_head_dim=16, v_head_dim=16, index_n_heads=8, index_head_dim=32, index_topk=16,
    intermediate_size=128, n_routed_experts=16, num_experts_per_tok=2, n_group=8, topk_group=4,
    moe_intermediate_size=32, max_seq_len=256,
)


class _Abort(Exception):
    pass


def _pass_source_digest() -> str:
    """Short hash of fx_indexcache/*.py: which version of the pass a row measured (the code moves)."""
    import hashlib

    h = hashlib.sha256()
    pkg = os.path.join(ROOT, "fx_indexcache")
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            h.update(name.encode())
            with open(os.path.join(pkg, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:10]


def child(n_layers: int, mode: str) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    from fx_indexcache import IndexCachePass, indexcache_backend
    from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel

    torch._inductor.config.fx_graph_cache = False
    cfg = DSAModelConfig.deepseek_v32(num_layers=n_layers, moe=True, **SMALL)
    model = ReferenceDSAModel(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 64))
    rec: dict = dict(layers=n_layers, mode=mode, pass_source=_pass_source_digest())
    orig = IndexCachePass.run
    t_call = [0.0]

    def timed(self, graph, graph_name=""):
        rec["post_grad_nodes"] = len(graph.nodes)
        rec["before_pass_s"] = time.perf_counter() - t_call[0]
        t = time.perf_counter()
        report = orig(self, graph, graph_name)
        rec["pass_s"] = time.perf_counter() - t
        rec["nodes_after"] = len(graph.nodes)
        rec["pattern"] = report.pattern
        rec["router_topk"] = report.router_topk
        if mode == "pass":
            raise _Abort()
        return report

    IndexCachePass.run = timed
    if mode == "plain":
        compiled = torch.compile(model, backend="inductor", dynamic=False)
    else:
        compiled = torch.compile(model, backend=indexcache_backend, dynamic=False,
                                 options={"index_topk_freq": 4})
    t_call[0] = time.perf_counter()
    with torch.no_grad():
        try:
            compiled(tokens)
        except Exception as e:  # noqa: BLE001  (dynamo wraps _Abort in BackendCompilerFailed)
            if mode != "pass" or "_Abort" not in repr(e) + repr(e.__cause__):
                raise
    rec["wall_s"] = time.perf_counter() - t_call[0]
    return rec


def run_child(n: int, mode: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="pc_ind_"))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{n}:{mode}"]
    t = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(layers=n, mode=mode, error=f"timeout after {timeout:.0f}s")
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            rec = json.loads(line[7:])
            rec["process_s"] = round(time.time() - t, 1)
            return rec
    return dict(layers=n, mode=mode, error=(p.stderr or p.stdout)[-400:].replace("\n", " | "))


def write(rows: list[dict], env: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    cols = ["layers", "mode", "pass_source", "post_grad_nodes", "nodes_after", "pass_s", "before_pass_s", "wall_s", "pattern",
            "router_topk", "error"]
    with open(os.path.join(out, "pass_cost.csv"), "w", newline="") as f:
        f.write("# " + ", ".join(f"{k}={v}" for k, v in env.items()) + "\n")
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    by = {(r["layers"], r["mode"]): r for r in rows}
    lines = ["# IndexCachePass compile-time cost (CPU)", "",
             "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), "",
             "Graphs: V3.2 structure (3 dense layers, then MoE with group-limited routers; MLA; indexer), small sizes "
             "(hidden 64); freq 4, offset 2. `pass` = IndexCachePass.run on the real post-grad graph; "
             "`full` / `plain` = whole first-call compile with / without the pass (fresh cache dir each).", "",
             "| layers | post-grad nodes | pass s (alone) | pass s (in full compile) | full compile s | plain compile s | "
             "pass / full compile | full - plain s | Dynamo+AOT+Inductor passes before ours s |",
             "|---|---|---|---|---|---|---|---|---|"]
    layers = sorted({r["layers"] for r in rows})
    f = lambda v, d=3: "" if v is None else f"{v:.{d}f}"  # noqa: E731
    for n in layers:
        p, fu, pl = by.get((n, "pass"), {}), by.get((n, "full"), {}), by.get((n, "plain"), {})
        frac = fu["pass_s"] / fu["wall_s"] if fu.get("pass_s") and fu.get("wall_s") else None
        diff = fu["wall_s"] - pl["wall_s"] if fu.get("wall_s") and pl.get("wall_s") else None
        lines.append(f"| {n} | {p.get('post_grad_nodes', fu.get('post_grad_nodes', ''))} | {f(p.get('pass_s'))} | "
                     f"{f(fu.get('pass_s'))} | {f(fu.get('wall_s'), 1)} | {f(pl.get('wall_s'), 1)} | "
                     f"{'' if frac is None else f'{100 * frac:.2f} %'} | {f(diff, 1)} | {f(p.get('before_pass_s'), 1)} |")
    errs = [r for r in rows if r.get("error")]
    if errs:
        lines += ["", "Errors / skipped:", ""] + [f"- {r['layers']} {r['mode']}: {r['error']}" for r in errs]
    with open(os.path.join(out, "pass_cost.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--layers", default="8,16,32,61")
    ap.add_argument("--full-layers", default="8,16")
    ap.add_argument("--out", default=os.environ.get("OUT"), required="OUT" not in os.environ,
                    help="folder for this run's files (default $OUT); nothing is written into the checkout unasked")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--append", action="store_true", help="keep the rows of --out/pass_cost.jsonl and add these")
    args = ap.parse_args()
    if args.child:
        n, mode = args.child.split(":")
        print("RESULT " + json.dumps(child(int(n), mode)), flush=True)
        return
    import torch

    env = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch=torch.__version__,
               python=platform.python_version(), threads=torch.get_num_threads(),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    rows: list[dict] = []
    store = os.path.join(args.out, "pass_cost.jsonl")
    if args.append and os.path.exists(store):
        with open(store) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    jobs = [(int(n), "pass") for n in args.layers.split(",") if n]
    for n in args.full_layers.split(","):
        if n:
            jobs += [(int(n), "full"), (int(n), "plain")]
    for n, mode in jobs:
        r = run_child(n, mode, args.timeout)
        rows.append(r)
        print(json.dumps(r), flush=True)
        write(rows, env, args.out)
        with open(store, "w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
