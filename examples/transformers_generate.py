"""IndexCache in transformers' generate(): the static-cache recipe, prefill and decode both rewritten.

transformers documents fast decoding as ``model.forward = torch.compile(model.forward, mode="reduce-overhead")``
then ``generate(..., cache_implementation="static")``. With ``IndexCacheBackend`` as the backend the same recipe
runs IndexCache in the prefill and in every decode step. This script builds a tiny random DeepSeek-V3.2 from
transformers (nothing is downloaded), generates greedily for two prompt lengths with and without IndexCache,
and prints each compiled graph's report and how many graphs were compiled (one per prompt length at most, none
per token).

    pip install 'fx-indexcache[hf]'      # transformers
    python examples/transformers_generate.py [--pattern FSS] [--eager-backend]

``--eager-backend`` runs the same rewrite without Inductor code generation (much faster to start). On CUDA the
mode records CUDA graphs; on the CPU Inductor skips them (the mode is still accepted).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers_deepseek_v32 import tiny_deepseek_v32  # the example beside this one

from fx_indexcache import IndexCacheBackend, IndexCacheEagerBackend, prepared_static_cache


def greedy(model, input_ids: torch.Tensor, new_tokens: int, cache, **kwargs) -> torch.Tensor:
    """transformers' greedy decoding with a static cache: the path compiled decoding takes."""
    cache.reset()
    return model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, past_key_values=cache, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="FSS", help="one F/S per decoder layer (sets the layer count)")
    parser.add_argument("--eager-backend", action="store_true", help="IndexCacheEagerBackend instead of Inductor")
    parser.add_argument("--prompts", default="10,17", help="comma list of prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model = tiny_deepseek_v32(len(args.pattern)).to(args.device)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (1, int(n)), generator=generator).to(args.device)
               for n in args.prompts.split(",")]
    # a static cache allocated up front (``cache_implementation="static"`` works too, except with transformers 5.17
    # on torch 2.11, which cannot compile the indexer cache's lazy allocation: see docs/transformers.md)
    cache = prepared_static_cache(model, batch_size=1, max_cache_len=max(p.shape[1] for p in prompts) + args.new_tokens)
    with torch.no_grad():
        # eager, every layer with its own indexer: on CUDA a static cache makes generate() compile its decode step
        # unless told not to
        without = [greedy(model, ids, args.new_tokens, cache, disable_compile=True) for ids in prompts]

    backend_class = IndexCacheEagerBackend if args.eager_backend else IndexCacheBackend
    backend = backend_class(index_topk_pattern=args.pattern)
    model.forward = torch.compile(model.forward, backend=backend, mode="reduce-overhead")
    start = time.perf_counter()
    with torch.no_grad():
        got = [greedy(model, ids, args.new_tokens, cache) for ids in prompts]
    print(f"{type(model).__name__}, pattern {args.pattern}, {backend!r}, {args.device}: "
          f"{len(prompts)} prompts x {args.new_tokens} tokens in {time.perf_counter() - start:.1f} s, "
          f"{len(backend.reports)} graphs compiled")
    for report in backend.reports:
        print(f"--- {report.format()}\n")
    print("(random weights: a tiny random model's greedy tokens follow any change in what its layers attend to; "
          "`fx-indexcache demo` compares IndexCache with the hand-written one on a trained model)")
    for ids, ours, theirs in zip(prompts, got, without):
        new = slice(ids.shape[1], None)
        print(f"prompt {ids.shape[1]:3d}: with IndexCache {ours[0, new].tolist()}, "
              f"without {theirs[0, new].tolist()}")


if __name__ == "__main__":
    main()
