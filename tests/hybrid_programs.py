"""DSA programs in styles the rest of the suite does not use, for the layer-identity tests.

Every program is a stack of decoder layers described by ``kinds``: ``"d"`` a dense layer (no indexer),
``"i"`` a DSA layer (one lightning indexer), ``"2"`` a DSA layer with two indexers. Inputs are unbatched
``[T, D]``. ``run(x, uses)`` is the hand-written oracle: ``uses[layer]`` is the layer whose indices that
layer reads (itself when it computes; for a two-indexer layer, both of its indexers alike).

Styles, each a way people write DSA models:

* ``in_layer``: ``layers.N`` blocks that call their own ``indexer`` submodule (transformers' way);
* ``indexer_list``: indexers kept in their own ``ModuleList`` (``indexers.j``, j counting DSA layers only),
  called from the model's loop, their indices handed to ``layers.N`` (the block that reads them);
* ``functional``: one flat ``ParameterList`` and plain functions: no module path names any layer.
"""

from __future__ import annotations

import torch
from torch import nn

T, D, H, HD, K = 6, 8, 2, 4, 3


def score_topk(x, wq, wk, ww):
    q = (x @ wq).unflatten(-1, (H, HD))
    k = x @ wk
    score = (torch.relu(torch.einsum("shd,td->sht", q, k)) * (x @ ww).unsqueeze(-1)).sum(1)
    causal = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).tril()
    return score.masked_fill(~causal, float("-inf")).topk(K, dim=-1).indices


def read(x, indices, wv):
    return x + torch.tanh((x @ wv)[indices].mean(1))


def dense(x, wv):
    return x + torch.tanh(x @ wv) * 0.5


def _weights(gen, n):
    return [nn.Parameter(torch.randn(*shape, generator=gen) / 2) for shape in [(D, H * HD), (D, HD), (D, H)] * n]


class Indexer(nn.Module):
    def __init__(self, gen) -> None:
        super().__init__()
        self.wq, self.wk, self.ww = _weights(gen, 1)

    def forward(self, x):
        return score_topk(x, self.wq, self.wk, self.ww)


class Layer(nn.Module):
    """One decoder layer; in ``in_layer`` style it owns its indexers."""

    def __init__(self, kind: str, gen, owns_indexers: bool) -> None:
        super().__init__()
        self.kind = kind
        self.wv = nn.Parameter(torch.randn(D, D, generator=gen) / D**0.5)
        count = {"d": 0, "i": 1, "2": 2}[kind]
        self.indexers = nn.ModuleList(Indexer(gen) for _ in range(count)) if owns_indexers else None

    def forward(self, x, given=None, cache=None, layer=None, uses=None):
        if self.kind == "d":
            return dense(x, self.wv)
        if given is None:  # in_layer style: compute own, keep, read what the oracle says
            cache[layer] = [indexer(x) for indexer in self.indexers]
            given = cache[uses[layer]] if uses is not None else cache[layer]
        for indices in given:
            x = read(x, indices, self.wv)
        return x


class HybridDSA(nn.Module):
    def __init__(self, kinds: str, style: str = "in_layer", break_at: int | None = None, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.kinds, self.style, self.break_at = kinds, style, break_at
        self.layers = nn.ModuleList(Layer(kind, gen, style == "in_layer") for kind in kinds)
        dsa = [i for i, kind in enumerate(kinds) if kind != "d"]
        self.slot = {layer: j for j, layer in enumerate(dsa)}  # DSA layer -> its position among DSA layers
        if style == "indexer_list":
            self.indexers = nn.ModuleList(
                nn.ModuleList(Indexer(gen) for _ in range({"i": 1, "2": 2}[kinds[layer]])) for layer in dsa)
        if style == "functional":
            self.w = nn.ParameterList(w for layer in dsa for _ in range({"i": 1, "2": 2}[kinds[layer]])
                                      for w in _weights(gen, 1))
            self.first = {}
            at = 0
            for layer in dsa:
                self.first[layer] = at
                at += 3 * {"i": 1, "2": 2}[kinds[layer]]

    def own_indices(self, layer, x):
        count = {"i": 1, "2": 2}[self.kinds[layer]]
        if self.style == "indexer_list":
            return [indexer(x) for indexer in self.indexers[self.slot[layer]]]
        start = self.first[layer]
        return [score_topk(x, self.w[start + 3 * j], self.w[start + 3 * j + 1], self.w[start + 3 * j + 2])
                for j in range(count)]

    def span(self, x, start, stop, uses, cache):
        for layer in range(start, stop):
            block = self.layers[layer]
            if self.style == "functional":  # plain functions of the flat weights: no module path anywhere
                wv = block.wv
                if self.kinds[layer] == "d":
                    x = dense(x, wv)
                    continue
                cache[layer] = self.own_indices(layer, x)
                for indices in cache[uses[layer]] if uses is not None else cache[layer]:
                    x = read(x, indices, wv)
                continue
            if self.kinds[layer] == "d" or self.style == "in_layer":
                x = block(x, None, cache, layer, uses)
                continue
            cache[layer] = self.own_indices(layer, x)
            x = block(x, cache[uses[layer]] if uses is not None else cache[layer])
        return x

    def forward(self, x, uses=None):
        cache: dict = {}
        if self.break_at is None:
            return self.span(x, 0, len(self.kinds), uses, cache)
        x = self.span(x, 0, self.break_at, uses, cache)
        torch._dynamo.graph_break()
        return self.span(x, self.break_at, len(self.kinds), uses, cache)


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def engine_uses(config, kinds: str) -> list[int]:
    """The layers each layer reads under the engines' one-buffer rule, over the single-indexer DSA layers (layers
    with two indexers compute: they are never paired)."""
    uses = list(range(len(kinds)))
    sources = config.buffer_sources([i for i, kind in enumerate(kinds) if kind == "i"])
    for layer, source in sources.items():
        uses[layer] = source
    return uses
