"""The paged decode logits kernel under Triton's interpreter (run by tests/test_paged_decode.py with
TRITON_INTERPRET=1). fp16 and fp8 keys (the interpreter reads bf16 as raw bits; bf16 runs in the GPU test),
pages shuffled in the pool, block-table entries past a request's length pointing outside the pool (they must
never be read), lengths of 0, a partial page and the full table, one and two queries, both kinds of launch (and
the default one), key blocks smaller than, equal to and spanning pages, one and three of them a program: each
must give the torch reference's logits and exactly its -inf pattern.
``--device cuda`` runs the same cases on the GPU (compiled, not interpreted): tests/gpu/test_paged_decode_gpu.py
runs that under compute-sanitizer's memcheck, where a read of the page outside the pool is an error."""

import itertools
import sys

import torch

from fx_indexcache.fuse.kernels import indexer_fp8 as f8
from fx_indexcache.fuse.kernels import paged_decode as pd


def main(device: str = "cpu") -> None:
    g = torch.Generator().manual_seed(0)
    B, H, D, PAGE, N, POOL = 3, 4, 32, 16, 3, 12
    keys = torch.randn(POOL, PAGE, D, generator=g).to(device)
    table = torch.randperm(POOL, generator=g)[: B * N].view(B, N).int()
    lens = torch.tensor([0, 21, N * PAGE], dtype=torch.int32).to(device)
    table[1, 2] = 10**6  # request 1 holds 21 tokens: its third page is never read
    table = table.to(device)
    cases = 0
    for S in (1, 2):
        q = torch.randn(B, S, H, D, generator=g).to(device)
        w = torch.randn(B, S, H, generator=g).to(device)
        for precision in ("fp16", "fp8"):
            if precision == "fp16":
                qk, kk, wk, ks = q.half(), keys.half(), w, None
                ref = pd.paged_decode_logits_reference(qk, kk, wk, table, lens)
            else:
                q8, qs = f8.quantize_rows_reference(q)
                kk, ks = f8.quantize_rows_reference(keys)
                qk, wk = q8, (w * qs).contiguous()
                ref = pd.paged_decode_logits_reference(q8.float(), kk, wk, table, lens, k_scale=ks)
            # key blocks smaller than, equal to and spanning pages; on the card only equal and spanning (the
            # compiled kernel's tl.dot takes 16 keys or more, a page here holds 16); one block a program, and
            # several (a program's blocks past a request's length, and past the table's end: 48 keys, 3 x 32);
            # the query's heads or the block's keys on the matrix unit's M side (both kinds of launch)
            block_ts = (8, 16, 32) if device == "cpu" else (16, 32, 64)
            configs = [pd.LogitsConfig(kind, 1, block_t, 4, 2, key_blocks=key_blocks)
                       for kind, block_t, key_blocks in itertools.product(pd.PAGED_KINDS, block_ts, (1, 3))]
            for config in configs + [None]:  # None: the default launch (the precision's rule here, the card's row there)
                out = pd.paged_decode_logits(qk, kk, wk, table, lens, k_scale=ks, config=config)
                name = "default" if config is None else config.name()
                check(out, ref, (S, precision, name), fp8_on_card=precision == "fp8" and device != "cpu")
                cases += 1
    print(f"ok {cases} cases")


#: fp8 on the card: the logits' relative error bound of the fp8 kernel's own GPU tests (tests/gpu/test_indexer_fp8_gpu.py):
#: the fp8 matrix unit accumulates its products in fewer bits than fp32, which single elements near zero magnify.
FP8_CARD_REL_TOL = 2e-3


def check(out, ref, where, fp8_on_card: bool = False) -> None:
    seen = torch.isfinite(ref)
    assert torch.equal(seen, torch.isfinite(out)) and torch.isneginf(out[~seen]).all(), where
    assert seen[1].sum() > 0 and not seen[0].any()
    if fp8_on_card:
        rel = ((out[seen] - ref[seen]).norm() / ref[seen].norm()).item()
        assert rel <= FP8_CARD_REL_TOL, (where, rel)
    else:
        torch.testing.assert_close(out[seen], ref[seen], rtol=1e-4, atol=1e-4, msg=lambda m: f"{where}: {m}")


if __name__ == "__main__":
    main(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu")
