"""The key-rows logits kernel counting its keys into the top-k's bins, under Triton's interpreter (run by
tests/test_logits_bins.py with TRITON_INTERPRET=1; fp16 operands: the interpreter reads bf16 as raw bits).

Decode and prefill shapes, one key block a program and a loop over three, one query a product and two, causal or
not, with and without kv_lens, keys of mixed magnitudes and signs: the logits must equal the launch without counts,
and the counts must equal ``topk_cuda.row_bins`` of those logits in every bin but the -inf one, which may hold fewer
(keys stored as -inf without a product are not counted).
"""

import torch

from fx_indexcache.fuse.kernels import lightning_indexer as li
from fx_indexcache.fuse.kernels import topk_cuda


def main() -> None:
    g = torch.Generator().manual_seed(0)
    ninf_bin = int(topk_cuda.row_bins(torch.tensor([[float("-inf")]])).argmax())
    cases = 0
    for B, S, T in ((2, 1, 70), (2, 5, 40)):
        H, D = 4, 32
        q = torch.randn(B, S, H, D, generator=g).half()
        k = (torch.randn(B, T, D, generator=g) * torch.exp2(torch.randint(-6, 7, (B, T, 1), generator=g).float())).half()
        w = torch.randn(B, S, H, generator=g)  # weights of either sign: negative logits too
        configs = [li.LogitsConfig("key_rows", 1, 16, 4, 1), li.LogitsConfig("key_rows", 1, 16, 4, 1, key_blocks=3),
                   li.LogitsConfig("key_rows", 4, 16, 4, 1, queries_per_dot=2)]
        for cfg in configs:
            for causal in (True, False):
                for kv_lens in (None, torch.tensor([T, T // 2 + 3])):
                    where = (B, S, T, cfg.name(), causal, kv_lens)
                    plain = torch.full((B, S, T), float("nan"))
                    li._launch(q, k, w, plain, causal, 0.5, kv_lens, cfg)
                    out = torch.full((B, S, T), float("nan"))
                    bins = torch.zeros(B * S, topk_cuda.ROW_BINS, dtype=torch.int32)
                    li._launch(q, k, w, out, causal, 0.5, kv_lens, cfg, bins=bins)
                    assert torch.equal(out, plain), where
                    want = topk_cuda.row_bins(out.view(B * S, T))
                    other = torch.arange(topk_cuda.ROW_BINS) != ninf_bin
                    assert torch.equal(bins[:, other], want[:, other]), where
                    assert bool((bins[:, ninf_bin] <= want[:, ninf_bin]).all()), where
                    assert int(bins.sum()) > 0 and bool((want[:, other].sum(1) > 0).all()), where  # (not vacuous)
                    cases += 1
    print(f"ok {cases} cases")


if __name__ == "__main__":
    main()
