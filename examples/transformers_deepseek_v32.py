"""IndexCache on transformers' DeepSeek-V3.2, built tiny and random (nothing is downloaded).

Compiles ``DeepseekV32ForCausalLM`` with ``fx_indexcache.indexcache_backend`` (Inductor plus the
IndexCache pass), runs a prefill and two decode steps with the model's own cache, prints the
pass's report for every compiled graph, and the largest difference from the oracle: the same
model run eagerly with each S layer's indexer patched to return its F layer's indices.

    PYTHONPATH=. python examples/transformers_deepseek_v32.py [--pattern FSFS] [--eager-backend]

``--eager-backend`` runs the same rewrite without Inductor code generation (much faster to start).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fx_indexcache
# the IndexCache oracle lives with the tests (tests/hf_oracle.py), not in the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hf_oracle  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="FSFS", help="one F/S per decoder layer (sets the layer count)")
    parser.add_argument("--eager-backend", action="store_true", help="indexcache_eager_backend instead of Inductor")
    parser.add_argument("--prompt", type=int, default=12, help="prefill length")
    parser.add_argument("--steps", type=int, default=2, help="decode steps after the prefill")
    args = parser.parse_args()

    tiny = hf_oracle.build(hf_oracle.SPECS["deepseek_v32"], num_layers=len(args.pattern))
    config = tiny.config
    print(
        f"DeepseekV32ForCausalLM: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"indexer {config.index_n_heads}x{config.index_head_dim} top-{config.index_topk}, "
        f"{config.n_routed_experts} experts (top-{config.num_experts_per_tok}); pattern {args.pattern}"
    )

    with tiny.oracle(args.pattern) as sources:
        expected = hf_oracle.prefill_and_decode(tiny.model, tiny, args.prompt, args.steps)
    untouched = hf_oracle.prefill_and_decode(tiny.model, tiny, args.prompt, args.steps)
    print("oracle: " + (", ".join(f"layer {s} uses layer {f}" for s, f in sources.items()) or "no layer shares"))

    backend = fx_indexcache.indexcache_eager_backend if args.eager_backend else fx_indexcache.indexcache_backend
    fx_indexcache.clear_reports()
    compiled = torch.compile(tiny.model, backend=backend, options={"index_topk_pattern": args.pattern})
    start = time.perf_counter()
    got = hf_oracle.prefill_and_decode(compiled, tiny, args.prompt, args.steps)
    print(f"compiled and ran prefill + {args.steps} decode steps in {time.perf_counter() - start:.1f} s\n")

    for report, step in zip(fx_indexcache.reports(), ["prefill"] + [f"decode {i + 1}" for i in range(args.steps)]):
        print(f"--- {step}\n{report.format()}\n")
    if not fx_indexcache.reports():
        print("(no report: Inductor served every graph from its FX graph cache, so the pass did not run)\n")

    for i, (mine, oracle, base) in enumerate(zip(got, expected, untouched)):
        step = "prefill" if i == 0 else f"decode {i}"
        print(
            f"{step:>9}: max |compiled - oracle| = {(mine - oracle).abs().max().item():.3g}"
            f"   (oracle vs model without IndexCache: {(oracle - base).abs().max().item():.3g})"
        )


if __name__ == "__main__":
    main()
