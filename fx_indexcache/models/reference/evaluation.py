"""Held-out quality of the reference model under an IndexCache pattern, in bits per byte, and its control.

The control (``shuffled_indexers``) is the same model with no learned indexer structure: what the trained
model's layer-to-layer overlap is compared against.
"""

from __future__ import annotations

import copy
import math

import torch

from .model import ReferenceDSAModel
from .training import Attention, next_byte_loss, training_forward


@torch.no_grad()
def bits_per_byte(
    model: ReferenceDSAModel,
    windows: torch.Tensor,
    pattern: str | None = None,
    batch_size: int = 16,
    attention: Attention | None = None,
) -> float:
    """Mean next-byte loss over ``windows`` [N, S] in bits, with ``pattern`` run by the hand-written IndexCache.

    ``attention=Attention.DENSE`` scores the model with dense attention instead (no top-k at all: the
    upper bound the sparse model is compared with); ``pattern`` must then be None.
    """
    if attention is Attention.DENSE and pattern is not None:
        raise ValueError("pattern applies to the sparse model only: pass attention=None with a pattern")
    device = model.lm_head.weight.device
    previous = model.index_cache_pattern
    model.set_index_cache_pattern(pattern)
    total, count = 0.0, 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            if attention is Attention.DENSE:
                logits = training_forward(model, ids, Attention.DENSE).logits
            else:
                logits = model(ids)
            positions = ids.shape[0] * (ids.shape[1] - 1)
            total += next_byte_loss(logits, ids).item() * positions
            count += positions
    finally:
        model.set_index_cache_pattern(previous)
    return total / count / math.log(2)


def shuffled_indexers(model: ReferenceDSAModel, seed: int = 0) -> ReferenceDSAModel:
    """A copy whose indexer weights are permuted entry by entry: same values, no learned structure."""
    copied = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in copied.layers:
            for p in layer.attn.indexer.parameters():
                order = torch.randperm(p.numel(), generator=generator).to(p.device)
                p.copy_(p.flatten()[order].view_as(p))
    return copied
