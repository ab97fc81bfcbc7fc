"""Small DSA programs for the layer-index and property tests: functional and module-based.

Both run unbatched (``x`` is ``[T, D]``), score keys with a lightning indexer
``Σ_h w[s,h]·ReLU(q[s,h]·k[t])`` masked by ``torch.where``, take a top-k over keys (or, with
``select="sort"``, a sort cut to its first K keys) and average
the selected values. ``uses`` is the hand-written IndexCache oracle: ``uses[i]`` is the layer
whose indices layer ``i`` reads (``i`` itself when it computes). ``break_at`` puts a graph break
at that layer boundary (in the top frame, so dynamo resumes after it).
"""

from __future__ import annotations

import torch
from torch import nn

T, D, H, HD, K = 6, 8, 2, 4, 3


def _causal_scores(x, wq, wk, ww):
    q = (x @ wq).unflatten(-1, (H, HD))  # [T, H, HD]
    k = x @ wk  # [T, HD]
    logits = torch.relu(torch.einsum("shd,td->sht", q, k))
    score = (logits * (x @ ww).unsqueeze(-1)).sum(1)  # [T, T]
    keep = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).tril()
    return torch.where(keep, score, torch.tensor(float("-inf")))


#: How a layer selects its K keys from the scores: a top-k, or a sort cut to its first K (the same keys).
SELECTIONS = {
    "topk": lambda score: score.topk(K, dim=-1).indices,
    "sort": lambda score: score.sort(-1, descending=True).indices[:, :K],
}


def indexer(x, wq, wk, ww, select: str = "topk"):
    return SELECTIONS[select](_causal_scores(x, wq, wk, ww))


def attend(x, indices, wv):
    return x + torch.tanh((x @ wv)[indices].mean(1))


class _Layers:
    """Shared driver: run layers ``range(start, stop)``, taking indices from ``uses``."""

    def run(self, x, start: int, stop: int, uses, cache: dict):
        for i in range(start, stop):
            own = self.indices(i, x)
            cache[i] = own
            x = self.mix(i, x, cache[uses[i]] if uses is not None else own)
        return x

    def forward(self, x, uses=None):
        cache: dict = {}
        if self.break_at is None:
            return self.run(x, 0, self.n, uses, cache)
        x = self.run(x, 0, self.break_at, uses, cache)
        torch._dynamo.graph_break()
        return self.run(x, self.break_at, self.n, uses, cache)


class FunctionalDSA(_Layers, nn.Module):
    """All weights in one flat ParameterList, layers as plain functions: no per-layer module path."""

    def __init__(self, n: int, break_at: int | None = None, seed: int = 0, select: str = "topk") -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        shapes = [(D, H * HD), (D, HD), (D, H), (D, D)]
        self.w = nn.ParameterList(nn.Parameter(torch.randn(*s, generator=gen)) for _ in range(n) for s in shapes)
        self.n, self.break_at, self.select = n, break_at, select

    def indices(self, i, x):
        return indexer(x, self.w[4 * i], self.w[4 * i + 1], self.w[4 * i + 2], self.select)

    def mix(self, i, x, indices):
        return attend(x, indices, self.w[4 * i + 3])


class Indexer(nn.Module):
    def __init__(self, gen, select: str = "topk") -> None:
        super().__init__()
        self.select = select
        self.wq = nn.Parameter(torch.randn(D, H * HD, generator=gen))
        self.wk = nn.Parameter(torch.randn(D, HD, generator=gen))
        self.ww = nn.Parameter(torch.randn(D, H, generator=gen))

    def forward(self, x):
        return indexer(x, self.wq, self.wk, self.ww, self.select)


class Block(nn.Module):
    def __init__(self, gen, select: str = "topk") -> None:
        super().__init__()
        self.indexer = Indexer(gen, select)
        self.wv = nn.Parameter(torch.randn(D, D, generator=gen))

    def forward(self, x, indices):
        return attend(x, indices, self.wv)


class ModuleDSA(_Layers, nn.Module):
    """``layers.N.indexer`` modules: module paths carry the layer number."""

    def __init__(self, n: int, break_at: int | None = None, seed: int = 0, select: str = "topk") -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(Block(gen, select) for _ in range(n))
        self.n, self.break_at = n, break_at

    def indices(self, i, x):
        return self.layers[i].indexer(x)

    def mix(self, i, x, indices):
        return self.layers[i](x, indices)


def uses_for(config, n: int, shared_layers=None) -> list[int]:
    """The oracle's ``uses`` for a config: each S layer in ``shared_layers`` (all S with an F source
    when None) reads its F layer's indices; every other layer reads its own."""
    uses = list(range(n))
    for i in range(n):
        source = config.source_layer(i) if config.layer_kind(i) == "S" else None
        if source is not None and (shared_layers is None or i in shared_layers):
            uses[i] = source
    return uses


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))
