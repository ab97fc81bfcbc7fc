"""Indices name tokens only within their layer's frame (``detection/index_frame.py``).

Sharing hands an S layer its F layer's top-k indices and keeps everything after the top-k the S layer's own. That
is IndexCache only where both layers' indices name the same tokens. A layer that scores a window of its keys
(``keys[off:off+W]``) and adds ``off`` to its indices has scores of the same width as a layer with another ``off``:
shapes prove nothing, and sharing silently read other tokens. Styles here: windows of keys with offset indices, a
window read by the attention alone, offsets alone, a position table per layer, and each layer's own decode cache
(the usual case, which must still share).
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import fx_indexcache as fic
from fx_indexcache.crossgraph.runtime import Fallback
from fx_indexcache.rewrite.share import SHARED

D, H, HD, K, T, W = 8, 2, 4, 3, 10, 8


class WindowIndexer(nn.Module):
    """Scores keys ``x[off:off+W]`` (``window``) or all keys, and hands back ``topk + off`` (``absolute``; over all
    keys, shifted round) or the top-k as it is (positions within the window)."""

    def __init__(self, gen, off: int, window: bool, absolute: bool) -> None:
        super().__init__()
        self.off, self.window, self.absolute = off, window, absolute
        self.wq = nn.Parameter(torch.randn(D, H * HD, generator=gen))
        self.wk = nn.Parameter(torch.randn(D, HD, generator=gen))
        self.ww = nn.Parameter(torch.randn(D, H, generator=gen))

    def forward(self, x):
        q = (x @ self.wq).unflatten(-1, (H, HD))
        keys = x[self.off:self.off + W] if self.window else x
        score = (torch.einsum("shd,td->sht", q, keys @ self.wk).relu() * (x @ self.ww)[..., None]).sum(1)
        top = score.topk(K, dim=-1).indices
        if not self.absolute:
            return top
        return top + self.off if self.window else (top + self.off) % x.shape[0]  # all keys: shifted round


class WindowLayer(nn.Module):
    def __init__(self, gen, off: int, window: bool, absolute: bool) -> None:
        super().__init__()
        self.indexer = WindowIndexer(gen, off, window, absolute)
        self.wv = nn.Parameter(torch.randn(D, D, generator=gen) / 3)

    def forward(self, x, indices):
        values = x @ self.wv
        if self.indexer.window and not self.indexer.absolute:  # positions within its own window
            values = values[self.indexer.off:self.indexer.off + W]
        return x + torch.tanh(values[indices].mean(1))


class WindowStack(nn.Module):
    def __init__(self, offsets, window: bool = True, absolute: bool = True) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(WindowLayer(gen, off, window, absolute) for off in offsets)

    def forward(self, x, uses=None):
        made = {}
        for i, layer in enumerate(self.layers):
            made[i] = layer.indexer(x)
            x = layer(x, made[uses[i]] if uses is not None else made[i])
        return x


def _compiled(model, pattern):
    backend = fic.IndexCacheEagerBackend(index_topk_pattern=pattern)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    (report,) = backend.reports
    return x, out, report


@pytest.mark.parametrize("window, absolute, says", [
    (True, True, "maps its indices to positions"),  # other keys and offset indices: the offsets differ first
    (True, False, "score's rows or keys"),  # positions within each layer's own window
    (False, True, "maps its indices to positions"),  # all keys, indices shifted per layer
])
def test_layers_whose_indices_name_other_tokens_compute(window, absolute, says):
    model = WindowStack([0, 2, 0, 2], window, absolute).eval()
    x, out, report = _compiled(model, "FSFS")
    assert report.indexers_removed == 0
    for decision in report.decisions[1::2]:
        assert decision.action != SHARED and says in decision.note, decision
    with torch.no_grad():
        assert not torch.equal(model(x), model(x, [0, 0, 2, 2]))  # sharing would have shown
        assert torch.equal(out, model(x))


@settings(max_examples=12, deadline=None)
@given(offsets=st.lists(st.sampled_from([0, 1, 2]), min_size=4, max_size=4),
       pattern=st.sampled_from(["FSFS", "FSSS", "FFSS"]))
def test_a_layer_shares_exactly_where_its_frame_is_its_sources(offsets, pattern):
    """Windows at ``offsets``: an S layer shares only with an F layer of the same window, and the output is the
    hand-written model's that reads the sources the report states."""
    torch._dynamo.reset()
    model = WindowStack(offsets).eval()
    x, out, report = _compiled(model, pattern)
    uses = list(range(4))
    config = fic.IndexCacheConfig(index_topk_pattern=pattern)
    for decision in report.decisions:
        source = config.source_layer(decision.layer) if pattern[decision.layer] == "S" else None
        same_frame = source is not None and offsets[source] == offsets[decision.layer]
        assert (decision.action == SHARED) == same_frame, (offsets, pattern, decision)
        if decision.action == SHARED:
            uses[decision.layer] = decision.source_layer
    assert report.indexers_removed == sum(u != i for i, u in enumerate(uses))
    with torch.no_grad():
        assert torch.equal(out, model(x, uses))


class PositionTableStack(WindowStack):
    """Each layer gathers its keys through a position table: its own, built in the layer from constants (rolled by
    one in every other layer: ``own``), or one the model builds once and hands every layer."""

    def __init__(self, own: bool) -> None:
        super().__init__([0, 0, 0, 0], window=False, absolute=False)
        self.own = own
        for i, layer in enumerate(self.layers):
            layer.indexer.forward = self._scores_through_table(layer.indexer, i % 2)

    def _scores_through_table(self, indexer, shift: int):
        def forward(x, positions=None):
            table = torch.arange(x.shape[0]).roll(shift) if positions is None else positions
            q = (x @ indexer.wq).unflatten(-1, (H, HD))
            keys = x[table] @ indexer.wk
            score = (torch.einsum("shd,td->sht", q, keys).relu() * (x @ indexer.ww)[..., None]).sum(1)
            return table[score.topk(K, dim=-1).indices]
        return forward

    def forward(self, x, uses=None):
        positions = None if self.own else torch.arange(x.shape[0]).flip(0)
        made = {}
        for i, layer in enumerate(self.layers):
            made[i] = layer.indexer(x, positions)
            x = layer(x, made[uses[i]] if uses is not None else made[i])
        return x


@pytest.mark.parametrize("own", [True, False])
def test_a_position_table_counts_by_what_it_is(own):
    """Tables rolled by one in every other layer map positions otherwise: those layers compute. One table the
    model hands every layer is one frame: they share."""
    model = PositionTableStack(own).eval()
    x, out, report = _compiled(model, "FSFS")
    with torch.no_grad():
        if own:
            assert not torch.equal(model(x), model(x, [0, 0, 2, 2]))  # sharing would have shown
            assert report.indexers_removed == 0 and torch.equal(out, model(x))
        else:
            assert report.indexers_removed == 2 and torch.equal(out, model(x, [0, 0, 2, 2]))


class CachedStack(nn.Module):
    """Decode against each layer's own key cache (``cat`` of its past keys and the new ones): per-layer data in one
    frame, so the layers share as ever."""

    def __init__(self, n: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(WindowLayer(gen, 0, False, False) for _ in range(n))

    def forward(self, x, past, uses=None):
        made = {}
        for i, layer in enumerate(self.layers):
            idx = layer.indexer
            q = (x @ idx.wq).unflatten(-1, (H, HD))
            keys = torch.cat([past[i], x @ idx.wk])
            score = (torch.einsum("shd,td->sht", q, keys).relu() * (x @ idx.ww)[..., None]).sum(1)
            made[i] = score.topk(K, dim=-1).indices
            values = torch.cat([past[i], x @ idx.wk]) @ torch.ones(HD, D)
            x = x + torch.tanh(values[made[uses[i]] if uses is not None else made[i]].mean(1))
        return x


def test_each_layers_own_cache_is_one_frame():
    model = CachedStack(4).eval()
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    gen = torch.Generator().manual_seed(2)
    x, past = torch.randn(2, D, generator=gen), [torch.randn(5, HD, generator=gen) for _ in range(4)]
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x, past)
        assert backend.reports[0].indexers_removed == 2
        assert torch.equal(out, model(x, past, [0, 0, 2, 2]))


def test_an_export_keeps_layers_of_other_windows_as_they_are():
    model = WindowStack([0, 2, 0, 0]).eval()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        program = torch.export.export(model, (x,), strict=False)
    report = fic.apply_index_cache_to_exported_program(program, index_topk_pattern="FSFS")
    assert {d.layer for d in report.decisions if d.action == SHARED} == {3}
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x, [0, 1, 2, 2]))


class BrokenWindowStack(WindowStack):
    """A graph break after every layer: dynamo compiles one layer graph per window and runs it as every layer of
    that window, so indices pass between graphs at run time (``crossgraph/runtime.py``)."""

    def forward(self, x, uses=None):
        made = {}
        for i, layer in enumerate(self.layers):
            made[i] = layer.indexer(x)
            x = layer(x, made[uses[i]] if uses is not None else made[i])
            torch._dynamo.graph_break()
        return x


@pytest.mark.parametrize("offsets, uses", [([0, 2, 2, 2], [0, 1, 2, 2]), ([0, 2, 0, 2], [0, 1, 2, 3])])
def test_across_graphs_a_layer_reads_only_indices_of_its_own_frame(offsets, uses):
    model = BrokenWindowStack(offsets).eval()
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        expected = model(x, uses)  # before the compiled calls: an eager call opens a forward of its own
        for _ in range(2):  # the first call compiles, the second runs the graphs as they stay
            assert torch.equal(compiled(x), expected)
    calls = {call.layer: call for call in backend.layer_calls(model)}
    for layer in (1, 3):
        if uses[layer] != layer:
            assert calls[layer].source_layer == uses[layer], calls
        else:
            assert calls[layer].fallback is Fallback.OTHER_FRAME, calls


def test_a_frame_the_reader_cannot_read_refuses_instead_of_crashing(monkeypatch):
    from fx_indexcache.detection import index_frame

    def unknown_op(anchor):
        raise NotImplementedError("an op the frame reader does not know")

    monkeypatch.setattr(index_frame, "_score_steps", unknown_op)
    model = WindowStack([0, 0, 0, 0]).eval()
    x, out, report = _compiled(model, "FSFS")
    assert report.indexers_removed == 0 and all("unreadable at" in d.note for d in report.decisions[1::2])
    with torch.no_grad():
        assert torch.equal(out, model(x))
