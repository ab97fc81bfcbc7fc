"""Tiny DSA programs for the parallelism tests (tensor parallel, sharded indexer rows, pipeline stages).

Every layer scores keys with a lightning indexer ``Σ_h w[s,h]·ReLU(q[s,h]·k[t])`` under a mask, takes a top-k
over keys and averages the selected values. ``uses[i]`` is the hand-written IndexCache oracle: the layer whose
indices layer ``i`` reads (``i`` itself when it computes).

* ``TensorParallelDSA``: the value path split over ranks by hand, with functional all-reduce (Megatron style:
  a column-split ``wv``, a row-split ``wo``); the indexer replicated. ``world=1`` is the single-process model.
* ``LinearDSA``: the value path as ``nn.Linear`` modules, for DTensor's ``parallelize_module``.
* ``MaskedDSA``: one layer style per mask the sharded indexer must keep exact: ``tril`` (a causal mask from a
  materialised triangle), ``arange`` (from positions), ``lengths`` (a batch of requests of different lengths),
  ``flat batch`` (the same, projected as one ``[B*T, D]`` matrix), ``varlen`` (several requests' tokens in one
  flattened row axis, as serving engines batch them), ``cumsum``
  (a score whose rows depend on each other: refused). It returns every layer's indices.
"""

from __future__ import annotations

import torch
from torch import nn

D, H, HD, K, V = 8, 2, 4, 3, 8


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scores(x, wq, wk, ww):
    """The lightning indexer's unmasked score ``[..., T, T]`` of hidden states ``x`` ``[..., T, D]``."""
    q = (x @ wq).unflatten(-1, (H, HD))
    k = x @ wk
    logits = torch.relu(torch.einsum("...shd,...td->...sht", q, k))
    return (logits * (x @ ww).unsqueeze(-1)).sum(-2)


def flat_scores(x, wq, wk, ww):
    """``scores`` with the batch flattened once for every projection (``[B*T, D]``, as transformers' models run a
    batch through their linear layers): the rows of each request are a run inside one merged axis."""
    batch, rows, _ = x.shape
    flat = x.reshape(batch * rows, D)
    q = (flat @ wq).view(batch, rows, H, HD)
    k = (flat @ wk).view(batch, rows, HD)
    weights = (flat @ ww).view(batch, rows, H)
    logits = torch.relu(torch.einsum("bshd,btd->bsht", q, k))
    return (logits * weights.unsqueeze(-1)).sum(-2)


def causal_topk(x, wq, wk, ww):
    score = scores(x, wq, wk, ww)
    keep = torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool).tril()
    return score.masked_fill(~keep, float("-inf")).topk(K, dim=-1).indices


class Indexer(nn.Module):
    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.wq = nn.Parameter(torch.randn(D, H * HD, generator=gen))
        self.wk = nn.Parameter(torch.randn(D, HD, generator=gen))
        self.ww = nn.Parameter(torch.randn(D, H, generator=gen))

    def forward(self, x):
        return causal_topk(x, self.wq, self.wk, self.ww)


def _all_reduce(x):
    from torch.distributed._functional_collectives import all_reduce

    return all_reduce(x, "sum", torch.distributed.group.WORLD)


class TensorParallelBlock(nn.Module):
    """``x + tanh(x @ wv)[indices].mean(1) @ wo`` with ``wv`` split by columns and ``wo`` by rows over ranks."""

    def __init__(self, gen: torch.Generator, rank: int, world: int) -> None:
        super().__init__()
        self.indexer = Indexer(gen)
        wv, wo = torch.randn(D, V, generator=gen) / D**0.5, torch.randn(V, D, generator=gen) / V**0.5
        width = V // world
        self.wv = nn.Parameter(wv[:, rank * width:(rank + 1) * width].clone())
        self.wo = nn.Parameter(wo[rank * width:(rank + 1) * width].clone())
        self.world = world

    def forward(self, x, indices):
        partial = torch.tanh(x @ self.wv)[indices].mean(1) @ self.wo
        return x + (_all_reduce(partial) if self.world > 1 else partial)


class _Stack(nn.Module):
    def forward(self, x, uses=None):
        cache = {}
        for i, layer in enumerate(self.layers):
            cache[i] = layer.indexer(x)
            x = layer(x, cache[uses[i]] if uses is not None else cache[i])
        return x


class TensorParallelDSA(_Stack):
    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        super().__init__()
        gen = _generator(seed)
        self.layers = nn.ModuleList(TensorParallelBlock(gen, rank, world) for _ in range(n))


class LinearBlock(nn.Module):
    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.indexer = Indexer(gen)
        self.v = nn.Linear(D, V, bias=False)
        self.o = nn.Linear(V, D, bias=False)
        with torch.no_grad():
            self.v.weight.copy_(torch.randn(V, D, generator=gen) / D**0.5)
            self.o.weight.copy_(torch.randn(D, V, generator=gen) / V**0.5)

    def forward(self, x, indices):
        return x + self.o(torch.tanh(self.v(x))[indices].mean(1))


class LinearDSA(_Stack):
    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__()
        gen = _generator(seed)
        self.layers = nn.ModuleList(LinearBlock(gen) for _ in range(n))


def tensor_parallel_plan(n: int) -> dict:
    """DTensor's plan for ``LinearDSA``: the value projection split by columns, the output by rows."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(n):
        plan[f"layers.{i}.v"] = ColwiseParallel()
        plan[f"layers.{i}.o"] = RowwiseParallel()
    return plan


# ---------------------------------------------------------------------------------------------- masks


def _masked(style: str, score, meta):
    """``score`` ``[..., T, T]`` masked as ``style`` says; ``meta`` holds the per-request data."""
    rows = score.shape[-2]
    if style == "tril":
        keep = torch.ones(rows, rows, dtype=torch.bool).tril()
    elif style in ("arange", "cumsum"):
        position = torch.arange(rows)
        keep = position.unsqueeze(0) <= position.unsqueeze(1)
    elif style in ("lengths", "flat batch"):  # batch [B, T, T]: causal, keys past each request's length masked
        position = torch.arange(rows)
        keep = (position.unsqueeze(0) <= position.unsqueeze(1)) & (position < meta.unsqueeze(-1)).unsqueeze(-2)
    elif style == "varlen":  # tokens of several requests in one row axis: meta = (request id, position) per token
        request, position = meta
        keep = (request.unsqueeze(1) == request.unsqueeze(0)) & (position.unsqueeze(0) <= position.unsqueeze(1))
    else:
        raise ValueError(style)
    if style == "cumsum":
        score = score.cumsum(-2)  # each row adds every row before it: rows depend on each other
    return score.masked_fill(~keep, float("-inf"))


class MaskedBlock(nn.Module):
    def __init__(self, gen: torch.Generator, style: str) -> None:
        super().__init__()
        self.style = style
        self.indexer = Indexer(gen)
        self.wv = nn.Parameter(torch.randn(D, D, generator=gen) / D**0.5)

    def indices(self, x, meta):
        score = (flat_scores if self.style == "flat batch" else scores)(x, self.indexer.wq, self.indexer.wk,
                                                                        self.indexer.ww)
        return _masked(self.style, score, meta).topk(K, dim=-1).indices

    def forward(self, x, indices):
        values = torch.tanh(x @ self.wv)
        if x.dim() == 3:  # batch: gather each request's own rows
            picked = torch.gather(values.unsqueeze(1).expand(-1, x.shape[1], -1, -1), 2,
                                  indices.unsqueeze(-1).expand(-1, -1, -1, D))
            return x + picked.mean(2)
        return x + values[indices].mean(1)


class MaskedDSA(nn.Module):
    def __init__(self, n: int, style: str, seed: int = 0) -> None:
        super().__init__()
        gen = _generator(seed)
        self.layers = nn.ModuleList(MaskedBlock(gen, style) for _ in range(n))

    def forward(self, x, meta=None, uses=None):
        cache, found = {}, []
        for i, layer in enumerate(self.layers):
            cache[i] = layer.indices(x, meta)
            found.append(cache[uses[i]] if uses is not None else cache[i])
            x = layer(x, found[-1])
        return x, found


def masked_inputs(style: str, rows: int, seed: int = 1):
    """``(x, meta)`` for ``MaskedDSA(style)``: ``rows`` query rows (per request for ``lengths``)."""
    gen = _generator(seed)
    if style in ("lengths", "flat batch"):
        return torch.randn(3, rows, D, generator=gen), torch.tensor([rows, rows - 2, 3])
    if style == "varlen":
        sizes = [rows - rows // 2 - 1, rows // 2, 1]  # three requests of different lengths, one of one token
        request = torch.cat([torch.full((n,), r) for r, n in enumerate(sizes)])
        position = torch.cat([torch.arange(n) for n in sizes])
        return torch.randn(rows, D, generator=gen), (request, position)
    return torch.randn(rows, D, generator=gen), None
