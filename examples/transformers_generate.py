"""IndexCache in transformers' generate(): the static-cache recipe, prefill and decode both rewritten.

transformers documents fast decoding as ``model.forward = torch.compile(model.forward, mode="reduce-overhead")``
then ``generate(..., cache_implementation="static")``. With ``IndexCacheBackend`` as the backend the same recipe
runs IndexCache in the prefill and in every decode step. This script builds a tiny random DSA model from
transformers (nothing is downloaded), generates greedily for two prompt lengths, and checks the tokens against the
hand-written IndexCache oracle (the indexer modules patched, no graph pass); it prints each compiled graph's report
and how many graphs were compiled.

    PYTHONPATH=. python examples/transformers_generate.py [--model deepseek_v32] [--pattern FSS] [--eager-backend]

``--eager-backend`` runs the same rewrite without Inductor code generation (much faster to start). On CUDA the
mode records CUDA graphs; on the CPU Inductor skips them (the mode is still accepted).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from fx_indexcache import IndexCacheBackend, IndexCacheEagerBackend, prepared_static_cache
# the IndexCache oracle lives with the tests (tests/hf_oracle.py), not in the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hf_oracle  # noqa: E402


def greedy(model, input_ids: torch.Tensor, new_tokens: int, cache, **kwargs) -> torch.Tensor:
    """transformers' greedy decoding with a static cache: the path compiled decoding takes."""
    cache.reset()
    return model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, past_key_values=cache, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deepseek_v32", choices=sorted(hf_oracle.SPECS))
    parser.add_argument("--pattern", default="FSS", help="one F/S per decoder layer (sets the layer count)")
    parser.add_argument("--eager-backend", action="store_true", help="IndexCacheEagerBackend instead of Inductor")
    parser.add_argument("--prompts", default="10,17", help="comma list of prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    tiny = hf_oracle.build(hf_oracle.SPECS[args.model], num_layers=len(args.pattern))
    model = tiny.model.to(args.device)
    prompts = [tiny.make_inputs(int(n), seed=i)["input_ids"].to(args.device) for i, n in enumerate(args.prompts.split(","))]
    # a static cache allocated up front (``cache_implementation="static"`` works too, except with transformers 5.17
    # on torch 2.11, which cannot compile the indexer cache's lazy allocation: see integrations/transformers_cache.py)
    cache = prepared_static_cache(model, batch_size=1, max_cache_len=max(p.shape[1] for p in prompts) + args.new_tokens)
    with torch.no_grad(), tiny.oracle(args.pattern):
        # eager: on CUDA a static cache makes generate() compile its decode step unless told not to
        expected = [greedy(model, ids, args.new_tokens, cache, disable_compile=True) for ids in prompts]

    backend_class = IndexCacheEagerBackend if args.eager_backend else IndexCacheBackend
    backend = backend_class(index_topk_pattern=args.pattern)
    model.forward = torch.compile(model.forward, backend=backend, mode="reduce-overhead")
    counters.clear()
    start = time.perf_counter()
    with torch.no_grad():
        got = [greedy(model, ids, args.new_tokens, cache) for ids in prompts]
    print(f"{type(model).__name__}, pattern {args.pattern}, {backend!r}, {args.device}: "
          f"{len(prompts)} prompts x {args.new_tokens} tokens in {time.perf_counter() - start:.1f} s, "
          f"{counters['stats']['unique_graphs']} graphs compiled")
    for report in backend.reports:
        print(f"--- {report.format()}\n")
    for ids, mine, want in zip(prompts, got, expected):
        print(f"prompt {ids.shape[1]:3d}: tokens {'==' if torch.equal(mine, want) else '!='} oracle  "
              f"{mine[0, ids.shape[1]:].tolist()}")


if __name__ == "__main__":
    main()
