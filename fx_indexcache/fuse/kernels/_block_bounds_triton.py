"""The Triton side of block bounds (``block_bounds.py``): what the key-rows logits kernel adds to its epilogue.
Module level, so the logits kernel can call these jit functions (also under ``TRITON_INTERPRET=1``)."""

import triton
import triton.language as tl


@triton.jit
def _group_maxima(logit, BLOCK_T: tl.constexpr, NQ: tl.constexpr, G: tl.constexpr):
    """``[G, NQ]``: for each query column of ``logit [BLOCK_T, NQ]``, the largest key of each class ``t % G`` of the
    block's keys (G disjoint groups; a program looping over key blocks merges its blocks' maxima class by class)."""
    return tl.max(tl.reshape(logit, [BLOCK_T // G, G, NQ]), axis=0)


@triton.jit
def _store_bounds(bounds_ptr, rows, nblk, blk, gm, ok, G: tl.constexpr, RANK: tl.constexpr):
    """Write each row's bound pair for block ``blk``: the floor, the RANK-th largest of its G group maxima (RANK
    distinct groups hold a key at or above it, so at least RANK keys of the block do), and the block's largest key.
    ``gm [G, NQ]`` (``_group_maxima``), ``rows [NQ]`` (b * S + s), stored where ``ok [NQ]``."""
    ordered = tl.sort(tl.trans(gm), dim=1, descending=True)  # [NQ, G]
    pick = tl.arange(0, G)[None, :] == RANK - 1
    floor = tl.max(tl.where(pick, ordered, float("-inf")), axis=1)
    top = tl.max(gm, axis=0)
    base = bounds_ptr + (rows.to(tl.int64) * nblk + blk) * 2
    tl.store(base, floor, mask=ok)
    tl.store(base + 1, top, mask=ok)
