"""DSA decoders whose layer loop graph-breaks, so dynamo compiles each layer on its own frame.

``LoopDecoder``: ``layers.N`` blocks called from a loop with an explicit ``graph_break()`` after
each layer (module paths inside the compiled graph are relative: ``indexer``). ``MoEDecoder``:
the "official-style" layer whose MoE dispatch reads expert counts with ``bincount().tolist()``
and loops over experts with ``torch.where``, which graph-breaks inside every layer.
Both take batched input ``[B, T, D]`` and an optional ``past`` (a decode step: the new tokens
attend to ``past`` keys too). ``uses`` is the hand-written oracle: ``uses[i]`` is the layer whose
indices layer ``i`` reads (``i`` itself when it computes).
"""

from __future__ import annotations

import torch
from torch import nn

D, H, HD, K, E = 8, 2, 4, 3, 3


class Indexer(nn.Module):
    select = "topk"  # or "sort": the same K keys by a descending sort cut to K (set on an instance)

    def __init__(self, gen) -> None:
        super().__init__()
        self.wq = nn.Parameter(torch.randn(D, H * HD, generator=gen))
        self.wk = nn.Parameter(torch.randn(D, HD, generator=gen))
        self.ww = nn.Parameter(torch.randn(D, H, generator=gen))

    def forward(self, x, keys):
        q = (x @ self.wq).unflatten(-1, (H, HD))  # [B, S, H, HD]
        k = keys @ self.wk  # [B, T, HD]
        score = (torch.relu(torch.einsum("bshd,btd->bsht", q, k)) * (x @ self.ww).unsqueeze(-1)).sum(2)
        s, t = x.shape[1], keys.shape[1]
        keep = torch.ones(s, t, dtype=torch.bool, device=x.device).tril(t - s)
        masked = torch.where(keep, score, torch.tensor(float("-inf")))
        if self.select == "sort":
            return masked.sort(-1, descending=True).indices[..., :K]
        return masked.topk(K, dim=-1).indices  # [B, S, K]


def attend(x, keys, indices, wv):
    """Mean of the selected keys' values, per query."""
    values = keys @ wv  # [B, T, D]
    picked = torch.gather(values.unsqueeze(1).expand(-1, indices.shape[1], -1, -1), 2,
                          indices.unsqueeze(-1).expand(-1, -1, -1, D))
    return x + torch.tanh(picked.mean(2))


class Block(nn.Module):
    """One DSA layer; returns its output and the indices it used."""

    def __init__(self, gen) -> None:
        super().__init__()
        self.indexer = Indexer(gen)
        self.wv = nn.Parameter(torch.randn(D, D, generator=gen) / D**0.5)

    def keys(self, x, past):
        return x if past is None else torch.cat([past, x], 1)

    def forward(self, x, past=None, shared=None):
        keys = self.keys(x, past)
        indices = self.indexer(x, keys) if shared is None else shared
        return self.mix(attend(x, keys, indices, self.wv)), indices

    def mix(self, x):
        return x


class MoE(nn.Module):
    """Data-dependent dispatch, as eager MoE code writes it: graph-breaks on ``.tolist()``."""

    def __init__(self, gen) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(D, E, generator=gen))
        self.experts = nn.ParameterList(nn.Parameter(torch.randn(D, D, generator=gen) / D**0.5) for _ in range(E))

    def forward(self, x):
        flat = x.reshape(-1, D)
        choice = (flat @ self.gate).argmax(-1)
        counts = torch.bincount(choice, minlength=E).tolist()
        out = torch.zeros_like(flat)
        for e in range(E):
            if counts[e] == 0:
                continue
            rows = torch.where(choice == e)[0]
            out[rows] = torch.tanh(flat[rows] @ self.experts[e])
        return x + out.reshape(x.shape)


class MoEBlock(Block):
    def __init__(self, gen) -> None:
        super().__init__(gen)
        self.moe = MoE(gen)

    def mix(self, x):
        return self.moe(x)


class LoopDecoder(nn.Module):
    """A decoder loop with a graph break after every layer."""

    block = Block

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(self.block(gen) for _ in range(n))

    def forward(self, x, past=None, order=None):
        """Layers in ``order`` (all, in turn, by default): the tests call them out of order too."""
        for i in range(len(self.layers)) if order is None else order:
            x, _ = self.layers[i](x, None if past is None else past[i])
            torch._dynamo.graph_break()
        return x

    def oracle(self, x, uses, past=None, order=None):
        """The hand-written IndexCache: layer ``i`` reads layer ``uses[i]``'s indices (from this call)."""
        cache = {}
        for i in range(len(self.layers)) if order is None else order:
            shared = cache[uses[i]] if uses[i] != i else None
            x, cache[i] = self.layers[i](x, None if past is None else past[i], shared)
        return x


class MoEDecoder(LoopDecoder):
    """The official-style decoder: no explicit break, the MoE dispatch breaks every layer."""

    block = MoEBlock

    def forward(self, x, past=None, order=None):
        for i in range(len(self.layers)) if order is None else order:
            x, _ = self.layers[i](x, None if past is None else past[i])
        return x


class DenseFirstDecoder(MoEDecoder):
    """DeepSeek's layout: the first layer has a dense MLP, the rest MoE; the first layer gets a graph of its own."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(n, seed)
        self.layers[0] = Block(torch.Generator().manual_seed(seed + 100))


class RegionBlock(Block):
    """The layer body as one ``nested_compile_region``: every layer calls the same compiled body."""

    @torch.compiler.nested_compile_region
    def forward(self, x, past=None, shared=None):
        keys = self.keys(x, past)
        return attend(x, keys, self.indexer(x, keys), self.wv)


class RegionDecoder(LoopDecoder):
    """Regional compilation: no graph break, one outer graph calling the shared body per layer."""

    block = RegionBlock

    def forward(self, x, past=None, order=None):
        for i in range(len(self.layers)) if order is None else order:
            x = self.layers[i](x, None if past is None else past[i])
        return x

    def oracle(self, x, uses, past=None, order=None):
        cache = {}
        for i in range(len(self.layers)) if order is None else order:
            layer = self.layers[i]
            keys = layer.keys(x, None if past is None else past[i])
            cache[i] = layer.indexer(x, keys) if uses[i] == i else cache[uses[i]]
            x = attend(x, keys, cache[i], layer.wv)
        return x


class SegmentDecoder(LoopDecoder):
    """Layers run in segments with a graph break between them, the break outside every layer loop: each
    segment is a graph of its own whose module paths are absolute (``layers.3``), so the pass numbers it.
    ``segments`` picks which ones run, in which order (the tests skip and repeat them)."""

    def run(self, x, past, start: int, stop: int):
        for i in range(start, stop):
            x, _ = self.layers[i](x, None if past is None else past[i])
        return x

    def forward(self, x, past=None, segments=((0, 2), (2, 4))):
        for start, stop in segments:
            x = self.run(x, past, start, stop)
            torch._dynamo.graph_break()
        return x

    def oracle_segments(self, x, uses, past=None, segments=((0, 2), (2, 4))):
        return self.oracle(x, uses, past, [i for start, stop in segments for i in range(start, stop)])


def functional_indexer(x, keys, p):
    """The lightning indexer as a plain function of one layer's weights (``p``: a ParameterDict)."""
    q = torch.einsum("bsd,dhe->bshe", x, p["wq"])
    k = keys @ p["wk"]
    score = torch.einsum("bsh,bsht->bst", x @ p["ww"], torch.relu(torch.einsum("bshe,bte->bsht", q, k)))
    s, t = x.shape[1], keys.shape[1]
    future = torch.arange(t, device=x.device)[None, :] > torch.arange(s, device=x.device)[:, None] + (t - s)
    return score.masked_fill(future, float("-inf")).topk(K, dim=-1).indices


class FunctionalDecoder(nn.Module):
    """Functional layers: no per-layer module is called, each layer's weights are a ``ParameterDict`` under
    ``layers.N``. One graph break in the top frame, after layer ``split - 1``: the first graph is numbered by
    its order (it starts the compiled frame), the graph after the break is numbered per call when it holds
    one layer (by its parameters' storage)."""

    def __init__(self, n: int, split: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(nn.ParameterDict({
            "wq": nn.Parameter(torch.randn(D, H, HD, generator=gen)),
            "wk": nn.Parameter(torch.randn(D, HD, generator=gen)),
            "ww": nn.Parameter(torch.randn(D, H, generator=gen)),
            "wv": nn.Parameter(torch.randn(D, D, generator=gen) / D**0.5)}) for _ in range(n))
        self.split = split

    def layer(self, i, x, past, shared=None):
        p = self.layers[i]
        keys = x if past is None else torch.cat([past[i], x], 1)
        indices = functional_indexer(x, keys, p) if shared is None else shared
        return attend(x, keys, indices, p["wv"]), indices

    def forward(self, x, past=None):
        for i in range(self.split):
            x, _ = self.layer(i, x, past)
        torch._dynamo.graph_break()
        for i in range(self.split, len(self.layers)):
            x, _ = self.layer(i, x, past)
        return x

    def oracle(self, x, uses, past=None):
        cache = {}
        for i in range(len(self.layers)):
            x, cache[i] = self.layer(i, x, past, cache[uses[i]] if uses[i] != i else None)
        return x
