"""IndexCache on transformers' DeepSeek-V3.2, built tiny and random (nothing is downloaded).

Builds ``DeepseekV32ForCausalLM`` from a small config, compiles it with ``fx_indexcache.indexcache_backend``
(Inductor plus the IndexCache pass) at an F/S pattern, runs a prefill and decode steps with the model's own
cache, and prints the pass's report for every compiled graph and how far IndexCache moved the logits from the
model run without it (S layers select with their F layer's indices, so they differ a little; all-F equals it).

    pip install 'fx-indexcache[hf]'      # transformers
    python examples/transformers_deepseek_v32.py [--pattern FSFS] [--eager-backend]

``--eager-backend`` runs the same rewrite without Inductor code generation (much faster to start).
"""

from __future__ import annotations

import argparse
import time

import torch

import fx_indexcache


def tiny_deepseek_v32(num_layers: int, seed: int = 0):
    """A DeepSeek-V3.2 with V3.2's structure (MLA, lightning indexer, MoE router) at toy sizes."""
    try:
        from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    except ImportError as error:
        raise SystemExit(f"this example needs transformers: pip install 'fx-indexcache[hf]' ({error})") from error
    config = DeepseekV32Config(
        vocab_size=96, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=48, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, index_topk=4, index_head_dim=16, index_n_heads=2,
        max_position_embeddings=256, pad_token_id=None, bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    return DeepseekV32ForCausalLM(config).eval()


@torch.no_grad()
def prefill_and_decode(model, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Logits of a prefill and of ``steps`` one-token decode steps (fixed tokens, so two runs see the same inputs)."""
    out = model(input_ids=prompt, use_cache=True)
    logits = [out.logits]
    for step in range(steps):
        token = torch.full((prompt.shape[0], 1), 2 + step, dtype=prompt.dtype)
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="FSFS", help="one F/S per decoder layer (sets the layer count)")
    parser.add_argument("--eager-backend", action="store_true", help="indexcache_eager_backend instead of Inductor")
    parser.add_argument("--prompt", type=int, default=12, help="prefill length (longer than the top-k of 4)")
    parser.add_argument("--steps", type=int, default=2, help="decode steps after the prefill")
    args = parser.parse_args()

    model = tiny_deepseek_v32(len(args.pattern))
    config = model.config
    print(f"DeepseekV32ForCausalLM: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"indexer {config.index_n_heads}x{config.index_head_dim} top-{config.index_topk}, "
          f"{config.n_routed_experts} experts (top-{config.num_experts_per_tok}); pattern {args.pattern}")
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    without = prefill_and_decode(model, prompt, args.steps)

    backend = fx_indexcache.indexcache_eager_backend if args.eager_backend else fx_indexcache.indexcache_backend
    fx_indexcache.clear_reports()
    compiled = torch.compile(model, backend=backend, options={"index_topk_pattern": args.pattern})
    start = time.perf_counter()
    with_index_cache = prefill_and_decode(compiled, prompt, args.steps)
    print(f"compiled and ran prefill + {args.steps} decode steps in {time.perf_counter() - start:.1f} s\n")

    for report in fx_indexcache.reports():  # one per compiled graph, in the order they were compiled
        print(f"{report.format()}\n")
    if not fx_indexcache.reports():
        print("(no report: Inductor served every graph from its FX graph cache, so the pass did not run)\n")
    for i, (ours, theirs) in enumerate(zip(with_index_cache, without)):
        step = "prefill" if i == 0 else f"decode {i}"
        print(f"{step:>9}: max |logits with IndexCache - without| = {(ours - theirs).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
