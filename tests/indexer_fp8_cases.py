"""The fp8 logits kernel under Triton's interpreter (run by tests/test_indexer_fp8.py with TRITON_INTERPRET=1).

The operands are quantised by the torch reference (the interpreter's own fp32 -> e4m3 conversion does
not round as the hardware does, so the Triton quantiser is checked on the GPU only); the kernel's
prefill, decode (one and several key blocks a program: blocks past T = 40 and past kv_lens) and key-rows
variants (the last one query per product and two, in programs of 1, 4 and 8 queries over S = 5: a group and
a program past the last query; and one group a program looping over key blocks), causal or not and with kv_lens,
must then give the reference's logits and the same -inf pattern.
"""

import torch

from fx_indexcache.fuse.kernels import indexer_fp8 as f8
from fx_indexcache.fuse.kernels import lightning_indexer as li


def quantised(q, k, w, scale):
    q8, qs = f8.quantize_rows_reference(q)
    k8, ks = f8.quantize_rows_reference(k)
    return f8.Fp8Operands(q8, k8, ks.contiguous(), (w.float() * qs * scale).contiguous())


def main() -> None:
    g = torch.Generator().manual_seed(0)
    B, S, T, H, D = 2, 5, 40, 4, 32
    q = torch.randn(B, S, H, D, generator=g).bfloat16()
    k = (torch.randn(B, T, D, generator=g) * torch.exp2(torch.randint(-3, 4, (B, T, 1), generator=g).float())).bfloat16()
    w = torch.randn(B, S, H, generator=g)
    ops = quantised(q, k, w, 0.5)
    cases = 0
    configs = [(li.LogitsConfig("prefill", 16, 16, 4, 1), (True,)), (li.LogitsConfig("decode", 2, 16, 4, 1), (True,)),
               (li.LogitsConfig("prefill", 16, 16, 4, 1, heads_per_step=2), (True, False)),
               (li.LogitsConfig("decode", 1, 16, 4, 1, key_blocks=2), (True, False)),
               (li.LogitsConfig("decode", 2, 8, 4, 1, key_blocks=3), (True,)),
               (li.LogitsConfig("key_rows", 1, 16, 4, 1), (True, False)),
               (li.LogitsConfig("key_rows", 4, 16, 4, 1, queries_per_dot=2), (True, False)),
               (li.LogitsConfig("key_rows", 8, 32, 4, 1, queries_per_dot=2), (True,)),
               (li.LogitsConfig("key_rows", 1, 16, 4, 1, key_blocks=3), (True, False)),
               (li.LogitsConfig("key_rows", 2, 8, 4, 1, queries_per_dot=2, key_blocks=2), (True,))]
    for cfg, causal_options in configs:
        for causal in causal_options:
            for kv_lens in (None, torch.tensor([40, 23])):
                out = torch.full((B, S, T), float("nan"))
                li._launch(ops.q8, ops.k8, ops.weights, out, causal, 1.0, kv_lens, cfg, k_scale=ops.k_scale)
                ref = f8.indexer_logits_fp8_reference(q, k, w, causal=causal, scale=0.5, kv_lens=kv_lens)
                seen = torch.isfinite(ref)
                where = (cfg.name(), causal, kv_lens)
                assert torch.equal(seen, torch.isfinite(out)) and torch.isneginf(out[~seen]).all(), where
                torch.testing.assert_close(out[seen], ref[seen], rtol=1e-5, atol=1e-5, msg=lambda m, where=where: f"{where}: {m}")
                cases += 1
    print(f"ok {cases} cases")


if __name__ == "__main__":
    main()
