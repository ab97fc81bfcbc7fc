"""The key-rows logits kernel writing its block bounds, under Triton's interpreter (run by tests/test_block_bounds.py
with TRITON_INTERPRET=1; fp16 operands: the interpreter reads bf16 as raw bits).

Decode and prefill shapes, one key block a program and a loop over three, one query a product and two, causal or
not, with and without kv_lens (blocks and query groups that see no key: -inf bounds without a product), weights
of either sign: the logits must equal the launch without bounds, and the bounds ``block_bounds.reference`` of them.
"""

import torch

from fx_indexcache.fuse.kernels import block_bounds
from fx_indexcache.fuse.kernels import lightning_indexer as li


def main() -> None:
    g = torch.Generator().manual_seed(0)
    cases = 0
    for B, S, T in ((2, 1, 70), (2, 5, 40)):
        H, D = 4, 32
        q = torch.randn(B, S, H, D, generator=g).half()
        k = (torch.randn(B, T, D, generator=g) * torch.exp2(torch.randint(-6, 7, (B, T, 1), generator=g).float())).half()
        w = torch.randn(B, S, H, generator=g)
        configs = [li.LogitsConfig("key_rows", 1, 16, 4, 1), li.LogitsConfig("key_rows", 1, 16, 4, 1, key_blocks=3),
                   li.LogitsConfig("key_rows", 4, 16, 4, 1, queries_per_dot=2)]
        for cfg in configs:
            if cfg.key_blocks > 1 and S > 1:
                continue  # (a loop over key blocks takes one group of queries a program)
            p = block_bounds.BoundsPlan(blocks=-(-T // (cfg.block_t * cfg.key_blocks)),
                                        span=cfg.block_t * cfg.key_blocks, groups=8, rank=3)
            for causal in (True, False):
                for kv_lens in (None, torch.tensor([T, T // 2 + 3])):
                    where = (B, S, T, cfg.name(), causal, kv_lens)
                    plain = torch.full((B, S, T), float("nan"))
                    li._launch(q, k, w, plain, causal, 0.5, kv_lens, cfg)
                    out = torch.full((B, S, T), float("nan"))
                    bounds = torch.full((B * S, p.blocks, 2), float("nan"))
                    li._launch(q, k, w, out, causal, 0.5, kv_lens, cfg, bounds=(bounds, p))
                    assert torch.equal(out, plain), where
                    want = block_bounds.reference(out.view(B * S, T), p)
                    assert torch.equal(bounds, want), (where, bounds, want)
                    finite = torch.isfinite(want[..., 0])
                    assert bool(finite.any()) and bool((~finite).any() or kv_lens is None), where  # (not vacuous)
                    cases += 1
    print(f"ok {cases} cases")


if __name__ == "__main__":
    main()
