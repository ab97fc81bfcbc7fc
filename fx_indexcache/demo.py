"""The main job: compile the built-in reference model with IndexCache and show what it did.

Prints the per-layer F/S table of each compiled graph, checks the compiled model against the
hand-written model-level IndexCache (indices exactly, logits within tolerance) in prefill and
in decode with the KV cache, and counts the top-k left in Inductor's generated code.
"""

from __future__ import annotations

import argparse
import re
import time

import torch
import torch._functorch.config
import torch._inductor.config
from torch._inductor.utils import run_and_get_code

from .backend import indexcache_backend
from .config import IndexCacheConfig
from .reference import DSAModelConfig, ReferenceDSAModel
from .report import clear_reports, reports


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--freq", type=int, default=4, help="index_topk_freq (default 4: the paper's 1/4)")
    parser.add_argument("--offset", type=int, default=2, help="index_skip_topk_offset")
    parser.add_argument("--pattern", default=None, help="index_topk_pattern, one F/S per layer")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=40, help="prefill length (longer than top-k)")
    parser.add_argument("--decode-steps", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model_config = DSAModelConfig.tiny(num_layers=args.layers)
    model = ReferenceDSAModel(model_config, seed=0, dtype=dtype)
    oracle = ReferenceDSAModel(model_config, seed=0, dtype=dtype)  # same weights, hand-written IndexCache
    options = {"index_topk_freq": args.freq, "index_skip_topk_offset": args.offset}
    if args.pattern:
        options = {"index_topk_pattern": args.pattern}
    config, _ = IndexCacheConfig.from_options(options)
    oracle_pattern = config.executed_pattern(model_config.num_layers)
    print(f"reference model: {model_config.num_layers} DSA layers, top-k {model_config.index_topk}, "
          f"hidden {model_config.hidden_size}, {args.dtype}; IndexCache options {options}")
    print(f"pattern as configured: {config.pattern_for(model_config.num_layers)}  "
          f"(hand-written IndexCache runs {oracle_pattern})\n")

    prompt = torch.randint(0, model_config.vocab_size, (args.batch, args.prompt))
    steps = torch.randint(0, model_config.vocab_size, (args.batch, args.decode_steps))
    compiled = torch.compile(model, backend=indexcache_backend, options=options, dynamic=True)
    clear_reports()
    worst = {"logits": 0.0, "indices": 0}
    # The demo shows the pass at work: a warm Inductor/AOTAutograd cache from an earlier run would serve the
    # graphs without running it, and the per-layer tables would be empty.
    no_cache = torch._inductor.config.patch(fx_graph_cache=False, fx_graph_remote_cache=False)
    no_autograd_cache = torch._functorch.config.patch(enable_autograd_cache=False)
    with torch.no_grad(), no_cache, no_autograd_cache:
        cache, oracle_cache = model.new_cache(args.batch), model.new_cache(args.batch)
        start = time.perf_counter()
        (logits, indices), code = run_and_get_code(compiled, prompt, cache, 0, True)
        compile_s = time.perf_counter() - start
        oracle.set_index_cache_pattern(oracle_pattern)
        expected, expected_indices = oracle(prompt, oracle_cache, 0, True)
        worst["logits"] = _max_diff(logits, expected)
        worst["indices"] = sum(int((a != b).sum()) for a, b in zip(indices, expected_indices))
        for step in range(args.decode_steps):
            token, position = steps[:, step : step + 1], args.prompt + step
            got = compiled(token, cache, position)
            want = oracle(token, oracle_cache, position)
            worst["logits"] = max(worst["logits"], _max_diff(got, want))

    for report in reports():
        print(report.format(), "\n")
    prefill = reports()[0]
    topk_calls = sum(len(re.findall(r"aten\.topk\.default\(", source)) for source in code)
    full = len(prefill.decisions) - prefill.indexers_removed
    print(f"prefill graph: generated code calls aten.topk {topk_calls} times "
          f"= {full} indexers (F layers) + {prefill.router_topk} MoE-router top-k; "
          f"the {prefill.indexers_removed} S-layer indexers are gone (compile took {compile_s:.1f} s)")
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    ok = worst["indices"] == 0 and worst["logits"] <= tolerance
    print(f"compiled vs hand-written IndexCache: indices differ at {worst['indices']} positions, "
          f"max |logit diff| {worst['logits']:.2e} over prefill + {args.decode_steps} decode steps "
          f"-> {'EQUAL' if ok else 'MISMATCH'}")
    return 0 if ok else 1
