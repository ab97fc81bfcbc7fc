"""Preallocated KV cache for the reference DSA model.

One pair of tensors per decoder layer:

* ``kv[i]``      ``[batch, capacity, kv_lora_rank + qk_rope_head_dim]`` -- the MLA latent
  (normalised kv-LoRA latent, then the RoPE'd shared key) of every cached position;
* ``index_k[i]`` ``[batch, capacity, index_head_dim]`` -- the lightning-indexer key of every
  cached position.

A forward call with ``start_pos=p`` and ``S`` tokens writes rows ``p .. p+S-1`` of these
tensors in place (under ``torch.compile`` they become input mutations) and reads rows
``0 .. p+S-1``.  A layer run as IndexCache "S" (shared indices) never writes its
``index_k`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DSACache:
    kv: list[torch.Tensor] = field(default_factory=list)
    index_k: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch_size: int,
        capacity: int,
        kv_dim: int,
        index_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> "DSACache":
        if batch_size < 1:
            raise ValueError(f"DSACache batch_size={batch_size!r} is invalid: must be >= 1")
        if capacity < 1:
            raise ValueError(f"DSACache capacity={capacity!r} is invalid: must be >= 1")
        kv = [torch.zeros(batch_size, capacity, kv_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        index_k = [
            torch.zeros(batch_size, capacity, index_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        return cls(kv=kv, index_k=index_k)

    @property
    def num_layers(self) -> int:
        return len(self.kv)

    @property
    def batch_size(self) -> int:
        return self.kv[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.kv[0].shape[1]

    def reset(self) -> None:
        """Zero every cached row (in place, so compiled graphs keep pointing at the same tensors)."""
        for t in self.kv:
            t.zero_()
        for t in self.index_k:
            t.zero_()

    def clone(self) -> "DSACache":
        return DSACache(kv=[t.clone() for t in self.kv], index_k=[t.clone() for t in self.index_k])
