"""A DSA stack written unlike the reference model: unbatched, a per-layer key cache, ``masked_fill``.

Each layer's lightning indexer scores the S new tokens (``x [S, hidden]``) against a past key cache
plus their own keys (``cat``: T = P + S keys), with the head sum written as ``mul`` + ``sum`` over an
``[S, H, T]`` intermediate and the causal mask by ``masked_fill``; the top-k keys feed a one-head sparse
attention over a value cache. ``forward(x, past_k, past_v, pattern=None)`` returns the output and each
layer's indices; ``pattern`` ("FSFS"...) is the hand-written IndexCache: an S layer reuses the indices
of the F layer before it. Used by the GPU tests and ``benchmarks/bench_kernel_in_model.py``.
"""

from __future__ import annotations

import torch
from torch import nn


class UnbatchedDSALayer(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int, topk: int, value_dim: int = 64) -> None:
        super().__init__()
        self.heads, self.head_dim, self.topk, self.value_dim = heads, head_dim, topk, value_dim
        self.wq = nn.Linear(hidden, heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden, head_dim, bias=False)
        self.ww = nn.Linear(hidden, heads, bias=False)
        self.wqa = nn.Linear(hidden, value_dim, bias=False)
        self.wv = nn.Linear(hidden, value_dim, bias=False)
        self.wo = nn.Linear(value_dim, hidden, bias=False)

    def indices(self, x: torch.Tensor, past_k: torch.Tensor) -> torch.Tensor:
        S = x.shape[0]
        q = self.wq(x).view(S, self.heads, self.head_dim)
        k = torch.cat([past_k, self.wk(x)])  # [T, D]
        T = k.shape[0]
        w = self.ww(x).float() * (self.heads**-0.5 * self.head_dim**-0.5)
        scores = torch.einsum("shd,td->sht", q.float(), k.float()).relu()
        score = (scores * w[:, :, None]).sum(1)  # [S, T]
        future = torch.arange(T, device=x.device)[None, :] > torch.arange(S, device=x.device)[:, None] + (T - S)
        return score.masked_fill(future, float("-inf")).topk(min(self.topk, T), dim=-1).indices

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, shared=None):
        idx = self.indices(x, past_k) if shared is None else shared
        S = x.shape[0]
        v = torch.cat([past_v, self.wv(x)])  # [T, dv]
        T = v.shape[0]
        picked = v[idx]  # [S, K, dv]
        logits = (self.wqa(x)[:, None, :] * picked).sum(-1).float() * self.value_dim**-0.5
        visible = idx <= torch.arange(S, device=x.device)[:, None] + (T - S)
        att = logits.masked_fill(~visible, float("-inf")).softmax(-1).to(picked.dtype)
        return x + self.wo((att[..., None] * picked).sum(1)), idx


class UnbatchedDSAStack(nn.Module):
    def __init__(self, num_layers: int = 4, hidden: int = 256, heads: int = 16, head_dim: int = 64,
                 topk: int = 128) -> None:
        super().__init__()
        self.layers = nn.ModuleList(UnbatchedDSALayer(hidden, heads, head_dim, topk) for _ in range(num_layers))
        self.head_dim = head_dim

    def empty_cache(self, past: int, device=None, dtype=None):
        """Per-layer past keys/values (random: a long context already in the cache)."""
        g = torch.Generator(device=device).manual_seed(past)
        ks = [torch.randn(past, self.head_dim, device=device, generator=g).to(dtype) for _ in self.layers]
        vs = [torch.randn(past, layer.value_dim, device=device, generator=g).to(dtype) for layer in self.layers]
        return ks, vs

    def forward(self, x: torch.Tensor, past_k=None, past_v=None, pattern: str | None = None):
        if past_k is None:
            past_k, past_v = self.empty_cache(0, x.device, x.dtype)
        all_idx, shared = [], None
        for i, layer in enumerate(self.layers):
            reuse = pattern is not None and pattern[i] == "S"
            x, idx = layer(x, past_k[i], past_v[i], shared if reuse else None)
            shared = idx
            all_idx.append(idx)
        return x, all_idx
