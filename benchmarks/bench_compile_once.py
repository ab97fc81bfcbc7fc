"""How many Inductor modules one compile of a whole model makes, and how long its first call takes (CPU).

A whole-model graph whose layer count is known compiles once; without the count the backend used to compile a
second, "publishing" variant for layers that do not exist. Run from the repository root:

    python benchmarks/bench_compile_once.py [--layers 6] [--out benchmarks/results/compile_once.json]

Prints one row per pattern source and appends the records (with the commit, torch version and date) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path

import torch

import fx_indexcache as fic
from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(layers: int, options: dict) -> dict:
    import torch._inductor.compile_fx as compile_fx

    torch._dynamo.reset()
    inner, calls = compile_fx.compile_fx_inner, []

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    compile_fx.compile_fx_inner = counting
    try:
        model = ReferenceDSAModel(DSAModelConfig.tiny(num_layers=layers), seed=0)
        ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
        compiled = torch.compile(model, backend=fic.indexcache_backend, options=options)
        no_cache = torch._inductor.config.patch(fx_graph_cache=False)
        with torch.no_grad(), no_cache, torch._functorch.config.patch(enable_autograd_cache=False):
            start = time.perf_counter()
            compiled(ids)
            seconds = time.perf_counter() - start
    finally:
        compile_fx.compile_fx_inner = inner
    return {"options": options, "layers": layers, "inductor_modules": len(calls), "first_call_s": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(args.layers, {"index_topk_freq": 4}),
            measure(args.layers, {"index_topk_pattern": fic.IndexCacheConfig(index_topk_freq=4).pattern_for(args.layers)})]
    meta = {"benchmark": "compile_once", "commit": _commit(), "torch": torch.__version__, "device": "cpu",
            "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat()}
    print(f"{'options':<40} {'Inductor modules':>16} {'first call s':>12}")
    for row in rows:
        print(f"{json.dumps(row['options']):<40} {row['inductor_modules']:>16} {row['first_call_s']:>12}")
    if args.out is not None:
        records = json.loads(args.out.read_text()) if args.out.exists() else []
        records += [{**meta, **row} for row in rows]
        args.out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
