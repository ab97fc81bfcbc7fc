"""Your model, your data: search an IndexCache pattern, save it, compile with the saved pattern, generate.

With ``--model DIR`` (a local transformers DSA checkpoint: config.json + safetensors, and its tokenizer) and
``--text FILE`` the search calibrates on your text; without them a tiny random DeepSeek-V3.2 is built here (nothing
is downloaded) and calibrated on random tokens, which shows the workflow, not a pattern worth keeping.

    PYTHONPATH=. python examples/choose_pattern.py [--model DIR --text FILE] [--keep 0.5] [--eager-backend]

Only the public API is used: ``search_pattern``, ``PatternChoice``, ``IndexCacheBackend.from_config``.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from fx_indexcache import IndexCacheBackend, IndexCacheEagerBackend, PatternChoice, prepared_static_cache, search_pattern


def tiny_deepseek_v32(layers: int = 4) -> transformers.PreTrainedModel:
    """A random 4-layer DeepSeek-V3.2 (MLA + DSA indexer, top-4 + MoE), small enough for a CPU."""
    config = transformers.DeepseekV32Config(
        vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=48, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, index_topk=4, index_head_dim=16, index_n_heads=2, first_k_dense_replace=1,
        max_position_embeddings=256, pad_token_id=None, bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    return transformers.DeepseekV32ForCausalLM(config).eval()


def text_batches(tokenizer, path: str, seq_len: int, count: int) -> list[torch.Tensor]:
    """``count`` consecutive windows of ``seq_len`` tokens of the file, one a batch."""
    with open(path, encoding="utf-8") as handle:
        ids = torch.tensor(tokenizer(handle.read())["input_ids"])
    if ids.numel() < seq_len * count:
        raise SystemExit(f"{path}: {ids.numel()} tokens, fewer than {count} windows of {seq_len}")
    return list(ids[: seq_len * count].view(count, 1, seq_len))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local transformers DSA checkpoint directory")
    parser.add_argument("--text", default=None, help="calibration text (with --model)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens a window (default 2 x top-k, at least 32)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--keep", default="0.5", help="F layers to keep: a count or a fraction")
    parser.add_argument("--save", default="pattern.json")
    parser.add_argument("--eager-backend", action="store_true", help="IndexCacheEagerBackend (no Inductor)")
    args = parser.parse_args()

    # 1. a model, and calibration batches
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = tiny_deepseek_v32(), None
    seq_len = args.seq_len or max(32, 2 * model.config.index_topk)
    if tokenizer is not None and args.text:
        batches = text_batches(tokenizer, args.text, seq_len, args.windows)
    else:
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randint(2, model.config.vocab_size, (1, seq_len), generator=generator)
                   for _ in range(args.windows)]

    # 2. search and save
    keep = float(args.keep) if "." in args.keep else int(args.keep)
    choice = search_pattern(model, batches, keep=keep, progress=True)
    print(f"{choice.model_class}: chosen {choice.pattern} ({choice.metric} {choice.score:.4g}); evenly spaced "
          f"{choice.uniform_pattern}: {choice.uniform_score if choice.uniform_score is None else f'{choice.uniform_score:.4g}'}")
    print(f"vLLM:   {choice.vllm_argument()}\nSGLang: {choice.sglang_argument()}")
    choice.save(args.save)

    # 3. compile with the saved pattern (checked against this model), generate
    PatternChoice.load(args.save).check(model)
    backend_class = IndexCacheEagerBackend if args.eager_backend else IndexCacheBackend
    backend = backend_class.from_config(model.config, pattern_file=args.save)
    prompt = batches[0][:, : seq_len // 2]
    cache = prepared_static_cache(model, batch_size=1, max_cache_len=prompt.shape[1] + 8)
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=8, do_sample=False, past_key_values=cache)
    print(f"generated with {backend!r}: {tokens[0, prompt.shape[1]:].tolist()}")
    print(backend.reports[0].format())


if __name__ == "__main__":
    main()
