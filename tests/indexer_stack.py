"""DSA stacks written unlike the reference model: unbatched, a per-layer key cache, ``masked_fill``.

Each layer's lightning indexer scores the S new tokens (``x [S, hidden]``) against a past key cache
plus their own keys (``cat``: T = P + S keys), with the head sum written as ``mul`` + ``sum`` over an
``[S, H, T]`` intermediate and the causal mask by ``masked_fill``; the top-k keys feed a one-head sparse
attention over a value cache. ``forward(x, past_k, past_v, pattern=None)`` returns the output and each
layer's indices; ``pattern`` ("FSFS"...) is the hand-written IndexCache: an S layer reuses the indices
of the F layer before it. Used by the GPU tests and ``benchmarks/bench_kernel_in_model.py``.

``indexer=`` picks how each layer's score is written: ``"fp32"`` (above: q, k and w upcast, the products
in fp32), or in the model's own dtype as most people write it (issue 28: no upcasts, every op bf16/fp16):
``"native_einsum"`` (``torch.einsum("shd,td->sht", q, kcache).relu()``) or ``"native_matmul"``
(``torch.matmul(q, kcache.T).relu()``) or ``"native_linear_maximum"`` (``torch.maximum(F.linear(q, kcache),
torch.tensor(0.))``), then the head-weighted ``mul`` + ``sum`` and ``masked_fill``.
``"contract"`` is the oracle of the fused path on a native stack: the same score computed in fp32 and
rounded once to the model's dtype (what ``indexer_logits_rounded`` returns). ``BatchedDSAStack`` is a
native batched one: ``x [B, S, hidden]``, a broadcasting ``matmul`` over ``[B, H, S, T]``, the head sum as
``einsum("bhst,bsh->bst")`` and a ``where`` mask. ``select="sort"`` makes the unbatched layers pick their keys
with a descending sort cut to k instead of ``topk`` (the same keys).
"""

from __future__ import annotations

import torch
from torch import nn


INDEXERS = ("fp32", "native_einsum", "native_matmul", "native_linear_maximum", "contract")


class UnbatchedDSALayer(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int, topk: int, value_dim: int = 64,
                 indexer: str = "fp32", select: str = "topk") -> None:
        super().__init__()
        if indexer not in INDEXERS:
            raise ValueError(f"indexer={indexer!r}: expected one of {INDEXERS}")
        if select not in ("topk", "sort"):
            raise ValueError(f"select={select!r}: expected 'topk' or 'sort'")
        self.heads, self.head_dim, self.topk, self.value_dim = heads, head_dim, topk, value_dim
        self.indexer, self.select = indexer, select
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
        c = self.heads**-0.5 * self.head_dim**-0.5
        if self.indexer == "fp32":
            w = self.ww(x).float() * c
            scores = torch.einsum("shd,td->sht", q.float(), k.float()).relu()
            score = (scores * w[:, :, None]).sum(1)  # [S, T]
        else:
            w = self.ww(x) * c  # in the model's dtype: the kernel reads it as rounded here
            if self.indexer == "native_einsum":
                score = (torch.einsum("shd,td->sht", q, k).relu() * w[:, :, None]).sum(1)
            elif self.indexer == "native_matmul":
                score = (torch.matmul(q, k.T).relu() * w[:, :, None]).sum(1)
            elif self.indexer == "native_linear_maximum":  # a ReLU spelt as a maximum with a constant zero
                score = torch.sum(torch.maximum(nn.functional.linear(q, k), torch.tensor(0.0)) * w[:, :, None], dim=1)
            else:  # contract: fp32 inside, rounded once where the score is stored
                scores = torch.einsum("shd,td->sht", q.float(), k.float()).relu()
                score = (scores * w.float()[:, :, None]).sum(1).to(x.dtype)
        future = torch.arange(T, device=x.device)[None, :] > torch.arange(S, device=x.device)[:, None] + (T - S)
        masked = score.masked_fill(future, float("-inf"))
        if self.select == "sort":
            return masked.sort(-1, descending=True).indices[:, : min(self.topk, T)]
        return masked.topk(min(self.topk, T), dim=-1).indices

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
                 topk: int = 128, indexer: str = "fp32", select: str = "topk") -> None:
        super().__init__()
        self.layers = nn.ModuleList(UnbatchedDSALayer(hidden, heads, head_dim, topk, indexer=indexer, select=select)
                                    for _ in range(num_layers))
        self.head_dim = head_dim

    def set_indexer(self, indexer: str) -> "UnbatchedDSAStack":
        """Switch every layer's score code (same weights): e.g. to ``"contract"`` for the fused path's oracle."""
        if indexer not in INDEXERS:
            raise ValueError(f"indexer={indexer!r}: expected one of {INDEXERS}")
        for layer in self.layers:
            layer.indexer = indexer
        return self

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


class BatchedDSALayer(nn.Module):
    """A native-dtype batched layer: ``x [B, S, hidden]``, key cache ``[B, T, D]``, scores ``[B, H, S, T]`` by a
    broadcasting ``matmul``, the head sum by ``einsum`` (a bmm in the model's dtype), a ``where`` mask."""

    def __init__(self, hidden: int, heads: int, head_dim: int, topk: int, value_dim: int = 64,
                 contract: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.topk, self.value_dim = heads, head_dim, topk, value_dim
        self.contract = contract  # the fused path's oracle: fp32 inside, rounded once at the score
        self.wq = nn.Linear(hidden, heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden, head_dim, bias=False)
        self.ww = nn.Linear(hidden, heads, bias=False)
        self.wqa = nn.Linear(hidden, value_dim, bias=False)
        self.wv = nn.Linear(hidden, value_dim, bias=False)
        self.wo = nn.Linear(value_dim, hidden, bias=False)

    def indices(self, x: torch.Tensor, past_k: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.heads, self.head_dim)
        k = torch.cat([past_k, self.wk(x)], dim=1)  # [B, T, D]
        T = k.shape[1]
        w = self.ww(x) * (self.heads**-0.5 * self.head_dim**-0.5)  # [B, S, H]
        if self.contract:
            scores = torch.matmul(q.float().transpose(1, 2), k.float().transpose(1, 2).unsqueeze(1)).relu()
            score = torch.einsum("bhst,bsh->bst", scores, w.float()).to(x.dtype)
        else:
            scores = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).unsqueeze(1)).relu()  # [B, H, S, T]
            score = torch.einsum("bhst,bsh->bst", scores, w)
        future = torch.arange(T, device=x.device)[None, :] > torch.arange(S, device=x.device)[:, None] + (T - S)
        return torch.where(future, float("-inf"), score).topk(min(self.topk, T), dim=-1).indices

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, shared=None):
        idx = self.indices(x, past_k) if shared is None else shared  # [B, S, K]
        B, S, _ = x.shape
        v = torch.cat([past_v, self.wv(x)], dim=1)  # [B, T, dv]
        T = v.shape[1]
        picked = v[torch.arange(B, device=x.device)[:, None, None], idx]  # [B, S, K, dv]
        logits = (self.wqa(x)[:, :, None, :] * picked).sum(-1).float() * self.value_dim**-0.5
        visible = idx <= torch.arange(S, device=x.device)[:, None] + (T - S)
        att = logits.masked_fill(~visible, float("-inf")).softmax(-1).to(picked.dtype)
        return x + self.wo((att[..., None] * picked).sum(2)), idx


class BatchedDSAStack(nn.Module):
    def __init__(self, num_layers: int = 4, hidden: int = 256, heads: int = 16, head_dim: int = 64,
                 topk: int = 128) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BatchedDSALayer(hidden, heads, head_dim, topk) for _ in range(num_layers))
        self.head_dim = head_dim

    def set_contract(self, contract: bool) -> "BatchedDSAStack":
        for layer in self.layers:
            layer.contract = contract
        return self

    def empty_cache(self, batch: int, past: int, device=None, dtype=None):
        g = torch.Generator(device=device).manual_seed(past)
        ks = [torch.randn(batch, past, self.head_dim, device=device, generator=g).to(dtype) for _ in self.layers]
        vs = [torch.randn(batch, past, layer.value_dim, device=device, generator=g).to(dtype) for layer in self.layers]
        return ks, vs

    def forward(self, x: torch.Tensor, past_k, past_v, pattern: str | None = None):
        all_idx, shared = [], None
        for i, layer in enumerate(self.layers):
            reuse = pattern is not None and pattern[i] == "S"
            x, idx = layer(x, past_k[i], past_v[i], shared if reuse else None)
            shared = idx
            all_idx.append(idx)
        return x, all_idx
