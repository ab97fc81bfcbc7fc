"""Block bounds: a decode top-k's threshold from the kernel that writes the row, in place of the top-k's sample.

The CUDA top-k of one row a block spends about a quarter of its time at decode (B1 x 32K, k = 2048) finding a
threshold from a sample of the row: dependent loads, then two histogram passes behind barriers. The logits
kernel has every key in registers before it stores it, so it can leave a summary instead. Each program cuts its
keys into ``groups`` classes (key position mod ``groups``) and writes, for each of its query rows, a pair:

- the **floor**: the ``rank``-th largest of the classes' maxima. ``rank`` distinct classes hold a key at or above
  it, so at least ``rank`` of the program's keys are at or above it;
- the **top**: the largest of its keys.

The top-k (``topk_cuda``'s bounded entries) takes ``m = ceil(k / rank)`` and the m-th largest floor of the row's
blocks as its threshold: m blocks each hold ``rank`` keys at or above it, so at least k keys of the row are. The
largest top is the row's largest key, which the filter's counted bins need. No sample, one rank pass over at most
1024 floors. ``rank`` is chosen so that m is ``SHARE`` of the blocks: a tenth of them may be low (keys crowded
in a few blocks) without loosening the threshold. Where more are hidden (a masked tail: kv_lens well below the
row's length) the m-th floor is -inf and the top-k samples the row as before.

The bounds only steer. The top-k's select counts the keys the filter kept, as with a sample, so bounds that are not
the row's cost time, never exactness; where they keep more candidates than its buffers hold, the top-k samples
the row instead and filters again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

#: The classes a block's keys are cut into, at most (and at most the keys of one key block of the launch).
GROUPS_MAX = 64
#: The share of a row's blocks whose floors the threshold is the lowest of (0.75 kept 3360-3610 candidates a 32K row
#: of random or logits rows at k = 2048, 0.9 kept 3270-3310: the wide block holds 4096).
SHARE = 0.9
#: Blocks a row at most: the wide top-k block ranks one floor a thread (1024 threads).
MAX_BLOCKS = 1024


@dataclasses.dataclass(frozen=True)
class BoundsPlan:
    """One launch's bounds: ``blocks`` pairs a row (one a logits program along the keys, ``span`` keys each), floors
    over ``groups`` classes at ``rank``."""

    blocks: int
    span: int
    groups: int
    rank: int

    def threshold_blocks(self, k: int) -> int:
        """m: the floors the threshold is the lowest of (``m * rank >= k``)."""
        return -(-k // self.rank)


def plan(T: int, k: int, block_t: int, key_blocks: int) -> Optional[BoundsPlan]:
    """The bounds of a key-rows logits launch of ``key_blocks`` blocks of ``block_t`` keys a program over rows of
    ``T`` keys, for a top-k of ``k``; None where they cannot give a tight threshold: more than ``MAX_BLOCKS``
    blocks, or a rank above half the classes (short rows, large k: the floor would sit far below the k-th key)."""
    span = block_t * key_blocks
    blocks = -(-T // span)
    groups = min(GROUPS_MAX, block_t)
    if blocks > MAX_BLOCKS or k < 1 or blocks < 1:
        return None
    rank = -(-k // math.ceil(SHARE * blocks))
    if rank > groups // 2:
        return None
    return BoundsPlan(blocks, span, groups, rank)


def empty(rows: int, p: BoundsPlan, device) -> torch.Tensor:
    """fp32 ``[rows, blocks, 2]`` for a logits launch to fill (floor, top)."""
    return torch.empty((rows, p.blocks, 2), dtype=torch.float32, device=device)


def check(bounds: torch.Tensor, rows: int, p: BoundsPlan, device, caller: str) -> None:
    """Bounds as the kernels write and read them: contiguous fp32 ``[rows, blocks, 2]`` on ``device``."""
    want = (rows, p.blocks, 2)
    if bounds.dtype != torch.float32 or tuple(bounds.shape) != want or not bounds.is_contiguous() \
            or bounds.device != torch.device(device):
        raise ValueError(f"{caller}: bounds must be contiguous float32 {list(want)} on {device} (block_bounds.empty), "
                         f"got {bounds.dtype} {list(bounds.shape)} on {bounds.device}")


def reference(logits2d: torch.Tensor, p: BoundsPlan) -> torch.Tensor:
    """The bounds a launch writes for rows ``logits2d [R, T]`` (torch; the tests' oracle): floor and top of each
    block of ``span`` keys, the classes being key position mod ``groups`` within the block."""
    R, T = logits2d.shape
    padded = torch.full((R, p.blocks * p.span), float("-inf"), dtype=torch.float32, device=logits2d.device)
    padded[:, :T] = logits2d
    maxima = padded.view(R, p.blocks, p.span // p.groups, p.groups).amax(dim=2)  # [R, blocks, groups]
    floor = maxima.sort(dim=-1, descending=True).values[..., p.rank - 1]
    return torch.stack((floor, maxima.amax(dim=-1)), dim=-1)


def threshold(bounds: torch.Tensor, p: BoundsPlan, k: int) -> torch.Tensor:
    """The threshold the top-k takes from ``bounds [R, blocks, 2]``: the m-th largest floor of each row (torch)."""
    m = p.threshold_blocks(k)
    return bounds[..., 0].sort(dim=-1, descending=True).values[:, m - 1]
