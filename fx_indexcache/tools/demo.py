"""The main job: compile the built-in reference model with IndexCache and show what it did.

The model is the trained checkpoint shipped in the package (``--random-weights``: the random-weight tiny MoE
model), fed held-out Python source bytes. Prints the per-layer F/S table of each compiled graph, checks the compiled model against the
hand-written model-level IndexCache (indices exactly, logits within tolerance) in prefill and
in decode with the KV cache, and counts the top-k left in Inductor's generated code.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import time

import torch
import torch._functorch.config
import torch._inductor.config
from torch._inductor.utils import run_and_get_code

from ..config import IndexCacheConfig
from ..integrations.backend import indexcache_backend
from ..models.reference import ReferenceDSAModel, corpus
from ..models.reference.training import next_byte_loss
from ..session import clear_reports, reports
from .calibration import add_reference_arguments, reference_model
from .cli import at_least, count

DEMO_LAYERS = 6
PROMPT = {"random": 40, "trained": 96}  # prefill lengths, both longer than the model's top-k (16 / 64)
#: Inductor's CPU compile of the prefill and decode graphs, seconds per decoder layer on 2 cores with torch 2.13
#: (6 layers: about two minutes on an idle machine; 3 layers: 2.8 min on a busy one), and what a busy machine or
#: Inductor's first run in a fresh environment adds (2 layers: 3.6 min in all on a crowded machine): the range the
#: demo announces before the silent compile
COMPILE_SECONDS_PER_LAYER_2_CORES = (20, 40)
COLD_OR_BUSY_EXTRA_SECONDS = 180


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--freq", type=int, default=4, help="index_topk_freq (default 4: the paper's 1/4)")
    parser.add_argument("--offset", type=int, default=2, help="index_skip_topk_offset")
    parser.add_argument("--pattern", default=None, help="index_topk_pattern, one F/S per layer")
    add_reference_arguments(parser, f"Default {DEMO_LAYERS} (Inductor takes minutes on 2 cores for all 16 of the "
                                    "checkpoint: --layers 16 for the whole model)")
    parser.add_argument("--batch", type=count, default=2)
    parser.add_argument("--prompt", type=count, default=None,
                        help=f"prefill length, longer than top-k (default {PROMPT['trained']} bytes for the trained "
                             f"checkpoint, {PROMPT['random']} tokens for random weights)")
    parser.add_argument("--decode-steps", type=at_least(0), default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def demo_tokens(model: ReferenceDSAModel, random: bool, batch: int, length: int) -> torch.Tensor:
    """[batch, length] inputs: random tokens for random weights, held-out source bytes for the trained model."""
    if random:
        return torch.randint(0, model.config.vocab_size, (batch, length))
    tokens = corpus.as_tokens(corpus.read_files(corpus.HELD_OUT_FILES))
    return corpus.windows(tokens, length, batch)


def describe_weights(model: ReferenceDSAModel, random: bool) -> tuple[str, bool]:
    """("trained checkpoint, its first 6 of 16 layers", False): what runs, and whether it is a whole trained model."""
    if random:
        return "random weights", False
    stored = json.loads(model.checkpoint_metadata["config"])["num_layers"]
    if stored == model.config.num_layers:
        return "trained checkpoint", True
    return f"trained checkpoint, its first {model.config.num_layers} of {stored} layers", False


def _bits_per_byte(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return next_byte_loss(logits, ids).item() / math.log(2)


@dataclasses.dataclass
class _Run:
    """What the compiled model did next to the hand-written IndexCache."""

    logits: torch.Tensor  # compiled prefill logits
    all_f_logits: torch.Tensor  # the model with every indexer
    code: list[str]  # Inductor's generated code of the prefill
    compile_s: float
    prefill_reports: int  # reports() of the prefill compile; the ones after them are the decode graph's
    max_logit_diff: float  # over prefill and decode steps
    index_mismatches: int  # prefill positions whose indices differ


def _options(args: argparse.Namespace) -> dict:
    if args.pattern:
        return {"index_topk_pattern": args.pattern}
    return {"index_topk_freq": args.freq, "index_skip_topk_offset": args.offset}


def _run_against_oracle(model, oracle, oracle_pattern: str, options: dict, args, tokens: torch.Tensor) -> _Run:
    """Prefill and decode the compiled model and the hand-written IndexCache (``oracle``) side by side."""
    prompt, steps = tokens[:, : args.prompt], tokens[:, args.prompt :]
    compiled = torch.compile(model, backend=indexcache_backend, options=options, dynamic=True)
    clear_reports()
    # The demo shows the pass at work: a warm Inductor/AOTAutograd cache from an earlier run would serve the
    # graphs without running it, and the per-layer tables would be empty.
    no_cache = torch._inductor.config.patch(fx_graph_cache=False, fx_graph_remote_cache=False)
    no_autograd_cache = torch._functorch.config.patch(enable_autograd_cache=False)
    with torch.no_grad(), no_cache, no_autograd_cache:
        cache, oracle_cache = model.new_cache(args.batch), model.new_cache(args.batch)
        start = time.perf_counter()
        (logits, indices), code = run_and_get_code(compiled, prompt, cache, 0, True)
        compile_s = time.perf_counter() - start
        prefill_reports = len(reports())
        then = ("; compiling the decode graph (one new token, reading the KV cache)..." if args.decode_steps else
                "; no decode steps asked for")
        print(f"prefill graph compiled and run in {compile_s:.0f} s{then}", flush=True)
        all_f = oracle(prompt)
        oracle.set_index_cache_pattern(oracle_pattern)
        expected, expected_indices = oracle(prompt, oracle_cache, 0, True)
        worst = _max_diff(logits, expected)
        mismatches = sum(int((a != b).sum()) for a, b in zip(indices, expected_indices))
        for step in range(args.decode_steps):
            token, position = steps[:, step : step + 1], args.prompt + step
            worst = max(worst, _max_diff(compiled(token, cache, position), oracle(token, oracle_cache, position)))
    return _Run(logits, all_f, code, compile_s, prefill_reports, worst, mismatches)


def compile_time_estimate(num_layers: int) -> str:
    """'1-4 min' for the demo's compile of ``num_layers`` layers on 2 CPU cores."""
    low, high = (per_layer * num_layers for per_layer in COMPILE_SECONDS_PER_LAYER_2_CORES)
    high += COLD_OR_BUSY_EXTRA_SECONDS
    return f"{max(1, round(low / 60))}-{round(high / 60)} min"


def announce(num_layers: int, args: argparse.Namespace) -> None:
    """What is about to be compiled and how long it takes: the compile itself prints nothing for minutes."""
    steps = f"{args.decode_steps} decode step{'s' if args.decode_steps != 1 else ''}"
    print(f"Compiling it with torch.compile (Inductor, with the IndexCache pass) into two graphs: prefill "
          f"({args.batch} x {args.prompt} tokens), then decode (one token a step, {steps}). Inductor writes and "
          f"builds C++ for each: {compile_time_estimate(num_layers)} for {num_layers} layers on 2 CPU cores (the upper "
          "end on a busy machine or Inductor's first run here), less on more cores; it prints nothing while it "
          "compiles.", flush=True)


def label(index: int, prefill_reports: int) -> str:
    """Which graph the ``index``-th report of the run belongs to."""
    return "prefill graph" if index < prefill_reports else "decode graph"


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    args.layers = args.layers or DEMO_LAYERS
    model = reference_model(args, dtype=dtype)
    oracle = copy.deepcopy(model)  # same weights, hand-written IndexCache
    model_config = model.config
    args.prompt = args.prompt or PROMPT["random" if args.random_weights else "trained"]
    options = _options(args)
    config, _ = IndexCacheConfig.from_options(options)
    oracle_pattern = config.executed_pattern(model_config.num_layers)
    weights, whole = describe_weights(model, args.random_weights)
    print(f"reference model ({weights}): {model_config.num_layers} DSA layers, top-k {model_config.index_topk}, "
          f"hidden {model_config.hidden_size}, {args.dtype}; IndexCache options {options}")
    print(f"pattern as configured: {config.pattern_for(model_config.num_layers)}  "
          f"(hand-written IndexCache runs {oracle_pattern})\n")

    tokens = demo_tokens(model, args.random_weights, args.batch, args.prompt + args.decode_steps)
    announce(model_config.num_layers, args)
    run = _run_against_oracle(model, oracle, oracle_pattern, options, args, tokens)
    print()
    for index, report in enumerate(reports()):
        print(f"== {label(index, run.prefill_reports)} ==")
        print(report.format(), "\n")
    _print_prefill_graph(reports()[0], run)
    if whole:  # the whole trained model: its loss means something
        prompt = tokens[:, : args.prompt]
        print(f"prompt next-byte loss: {_bits_per_byte(run.all_f_logits, prompt):.3f} bits/byte with every indexer, "
              f"{_bits_per_byte(run.logits, prompt):.3f} with pattern {oracle_pattern} (compiled)")
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    ok = run.index_mismatches == 0 and run.max_logit_diff <= tolerance
    print(f"compiled vs hand-written IndexCache: indices differ at {run.index_mismatches} positions, "
          f"max |logit diff| {run.max_logit_diff:.2e} over prefill + {args.decode_steps} decode steps "
          f"-> {'EQUAL' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _print_prefill_graph(prefill, run: _Run) -> None:
    """How many top-k the generated prefill code still calls, against the report's F layers and routers."""
    # a fused F layer (CUDA) calls the fused top-k op instead of aten.topk: count both. A graph that publishes its
    # last F layer's indices for later graphs is compiled twice (as it is, and the publishing variant): per variant.
    counts = [len(re.findall(r"(?:aten\.topk|fx_indexcache\.topk_indices)\.default\(", source)) for source in run.code]
    if len(counts) == 1:
        calls = f"generated code calls a top-k {counts[0]} times"
    elif len(set(counts)) == 1:
        calls = f"generated code (each of its {len(counts)} compiled variants) calls a top-k {counts[0]} times"
    else:
        calls = f"its {len(counts)} compiled variants call a top-k {counts} times"
    full = len(prefill.decisions) - prefill.indexers_removed
    print(f"prefill graph: {calls} "
          f"= {full} indexers (F layers) + {prefill.router_topk} MoE-router top-k; "
          f"the {prefill.indexers_removed} S-layer indexers are gone (compile took {run.compile_s:.1f} s)")
