"""S layers' indexer key-cache writes under the default ``drop_shared_indexer_cache_writes=None``.

The rule: the writes go where the graph proves nothing else computes the layer (the graph holds every decoder
layer of a model whose layer count is known, and no call of the model runs eagerly beside it), and stay
everywhere else. A later graph that would compute a dropped layer fails loudly (the session's ledger).

The model here keeps its caches the way a static-cache model does: buffers of the layer modules, written in place
at the decode position, so a compiled graph writes them with ``copy_`` into an input (what can be dropped).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_indexcache as fic
from fx_indexcache.context import GraphContext

D, H, HD, K, MAX = 8, 2, 4, 3, 16


class CachedIndexer(nn.Module):
    """A lightning indexer with its own key cache (a buffer), scoring every cached key."""

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.wq = nn.Parameter(torch.randn(D, H * HD, generator=gen))
        self.wk = nn.Parameter(torch.randn(D, HD, generator=gen))
        self.ww = nn.Parameter(torch.randn(D, H, generator=gen))
        self.register_buffer("keys", torch.zeros(MAX, HD))

    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        end = pos + x.shape[0]
        self.keys[pos:end] = x @ self.wk
        q = (x @ self.wq).unflatten(-1, (H, HD))
        score = (torch.relu(torch.einsum("shd,td->sht", q, self.keys[:end])) * (x @ self.ww).unsqueeze(-1)).sum(1)
        visible = torch.arange(end) <= torch.arange(x.shape[0]).unsqueeze(-1) + pos
        return torch.where(visible, score, float("-inf")).topk(K, dim=-1).indices


class CachedLayer(nn.Module):
    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.indexer = CachedIndexer(gen)
        self.wv = nn.Parameter(torch.randn(D, D, generator=gen))
        self.register_buffer("values", torch.zeros(MAX, D))

    def forward(self, x: torch.Tensor, pos: int, indices: torch.Tensor) -> torch.Tensor:
        end = pos + x.shape[0]
        self.values[pos:end] = x @ self.wv
        return x + torch.tanh(self.values[:end][indices].mean(1))


class CachedModel(nn.Module):
    """Four layers in a ModuleList; ``uses`` is the hand-written IndexCache oracle (the layer whose indices each
    layer reads); ``break_after`` puts a graph break after that layer."""

    def __init__(self, n: int = 4, break_after: int | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.layers = nn.ModuleList(CachedLayer(gen) for _ in range(n))
        self.break_after = break_after

    def forward(self, x: torch.Tensor, pos: int, uses=None) -> torch.Tensor:
        chosen: dict = {}
        split = len(self.layers) if self.break_after is None else self.break_after + 1
        x = self.run(x, pos, uses, chosen, 0, split)
        if split < len(self.layers):
            torch._dynamo.graph_break()  # in the top frame: dynamo resumes after it with the later layers
            x = self.run(x, pos, uses, chosen, split, len(self.layers))
        return x

    def run(self, x, pos, uses, chosen, start, stop):
        for i in range(start, stop):
            layer = self.layers[i]
            if uses is None or uses[i] == i:
                chosen[i] = layer.indexer(x, pos)
            x = layer(x, pos, chosen[uses[i] if uses is not None else i])
        return x


FSFS = [0, 0, 2, 2]


def _steps(model: nn.Module, **kwargs) -> list[torch.Tensor]:
    """A prefill of 5 tokens, then two decode steps."""
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randn(7, D, generator=gen)
    with torch.no_grad():
        return [model(tokens[:5], 0, **kwargs), model(tokens[5:6], 5, **kwargs), model(tokens[6:7], 6, **kwargs)]


def _compiled(model: nn.Module, backend) -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend=backend)


def _s_key_rows(model: CachedModel) -> int:
    return sum(int(torch.count_nonzero(model.layers[i].indexer.keys)) for i in (1, 3))


def test_the_default_drops_s_layer_writes_in_a_graph_holding_the_whole_model():
    oracle, model = CachedModel(), CachedModel()
    want = _steps(oracle, uses=FSFS)
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    got = _steps(_compiled(model, backend))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert _s_key_rows(model) == 0 and _s_key_rows(oracle) == 0  # the hand-written model never writes them either
    assert torch.count_nonzero(model.layers[2].indexer.keys[:7]) > 0  # F layers still write theirs
    for report in backend.reports:
        shared = [d for d in report.decisions if d.action == "shared"]
        assert [d.layer for d in shared] == [1, 3]
        assert all(d.cache_bytes_saved > 0 and "all 4 decoder layers" in d.note for d in shared), shared


def test_the_default_keeps_them_where_a_graph_break_splits_the_model():
    """Neither graph holds the whole model: a cross-graph fallback may compute an S layer, so the writes stay, and
    the output is still IndexCache's (layer 3 reads layer 2 inside the second graph)."""
    oracle, model = CachedModel(break_after=1), CachedModel(break_after=1)
    want = _steps(oracle, uses=FSFS)
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    got = _steps(_compiled(model, backend))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    decisions = [d for report in backend.reports for d in report.decisions if d.layer == 3 and d.action == "shared"]
    assert decisions and all(d.cache_bytes_saved == 0 and "writes kept" in d.note for d in decisions), decisions
    assert torch.count_nonzero(model.layers[3].indexer.keys[:7]) > 0  # every row a computing layer 3 would read


def test_false_keeps_them_in_a_whole_model_graph():
    model = CachedModel()
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS", drop_shared_indexer_cache_writes=False)
    _steps(_compiled(model, backend))
    assert _s_key_rows(model) > 0
    assert all(d.cache_bytes_saved == 0 for report in backend.reports for d in report.decisions)


def test_a_later_graph_computing_a_dropped_layer_fails_instead_of_reading_unwritten_rows():
    model = CachedModel()
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    compiled = _compiled(model, backend)
    _steps(compiled)  # whole-model graphs: layers 1 and 3 drop their writes
    model.break_after = 0  # the same model now compiles to graphs that do not hold layer 1's F layer
    with pytest.raises(Exception, match=r"CacheWriteConflict: .*layer 1 .* dropped its indexer key-cache writes"):
        _steps(compiled)


def test_eager_calls_beside_the_graph_keep_the_writes():
    """transformers' decode-step compile runs the prefill eagerly: every layer computes there, reading its cache,
    so the decode graph keeps the S layers' writes even though it holds the whole model."""
    model = CachedModel()
    config = fic.IndexCacheConfig(index_topk_pattern="FSFS")
    reports = []

    def backend(gm, example_inputs):
        from fx_indexcache.detection.frames import dynamo_graph_starts_at_first_layer
        from fx_indexcache.integrations.backend import aten_graph_backend

        context = GraphContext(starts_at_first_layer=dynamo_graph_starts_at_first_layer(), model_layers=4,
                               eager_calls="the prefill runs eagerly")
        graph_pass = fic.IndexCachePass(config, context=context, session=fic.IndexCacheSession())

        def rewrite(module):
            reports.append(graph_pass.run(module.graph))
            module.recompile()
            return module.forward

        return aten_graph_backend(rewrite, keep_inference_input_mutations=True)(gm, example_inputs)

    _steps(_compiled(model, backend))
    shared = [d for report in reports for d in report.decisions if d.action == "shared"]
    assert shared and all(d.cache_bytes_saved == 0 and "writes kept" in d.note for d in shared), shared
    assert _s_key_rows(model) > 0


class ReadsALaterLayersCache(CachedModel):
    """Layer 0's indexer also scores against layer 1's cached keys (the rows earlier calls wrote), before layer 1
    writes this call's: the cache has a reader besides its own layer's indexer."""

    def run(self, x, pos, uses, chosen, start, stop):
        if start == 0:
            borrowed = self.layers[1].indexer.keys
            own = self.layers[0].indexer
            own.keys[pos: pos + x.shape[0]] = x @ own.wk
            end = pos + x.shape[0]
            q = (x @ own.wq).unflatten(-1, (H, HD))
            keys = own.keys[:end] + borrowed[:end]
            score = (torch.relu(torch.einsum("shd,td->sht", q, keys)) * (x @ own.ww).unsqueeze(-1)).sum(1)
            visible = torch.arange(end) <= torch.arange(x.shape[0]).unsqueeze(-1) + pos
            chosen[0] = torch.where(visible, score, float("-inf")).topk(K, dim=-1).indices
            x = self.layers[0](x, pos, chosen[0])
            start = 1
        return super().run(x, pos, uses, chosen, start, stop)


def test_a_cache_another_layer_reads_keeps_its_writes():
    model = ReadsALaterLayersCache()
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    _steps(_compiled(model, backend))
    layer_1 = [d for report in backend.reports for d in report.decisions if d.layer == 1]
    assert layer_1 and all(d.action == "shared" and d.cache_bytes_saved == 0 for d in layer_1), layer_1
    assert torch.count_nonzero(model.layers[1].indexer.keys[:7]) > 0  # layer 0 reads these rows next call
    layer_3 = [d for report in backend.reports for d in report.decisions if d.layer == 3]
    assert all(d.cache_bytes_saved > 0 for d in layer_3)  # a cache only its own indexer reads still drops


def test_a_compiled_function_finds_the_layer_count_of_the_model_it_holds():
    """``torch.compile(step)`` with ``step`` calling a model from its closure: the model is on no stack at compile
    time, yet its config's count (not the pattern's: freq keys here) proves the graph whole, so the writes drop;
    holding two models of different depths states no count, so they stay."""
    from types import SimpleNamespace

    def compile_step(model, draft=None):
        def step(x, pos):
            if draft is not None:
                draft.break_after = None  # the closure holds both models
            return model(x, pos)

        backend = fic.IndexCacheEagerBackend(index_topk_freq=2, index_skip_topk_offset=1)
        torch._dynamo.reset()
        compiled = torch.compile(step, backend=backend)
        gen = torch.Generator().manual_seed(9)
        with torch.no_grad():
            compiled(torch.randn(5, D, generator=gen), 0)
        return [d for report in backend.reports for d in report.decisions if d.action == "shared"]

    model = CachedModel()
    model.config = SimpleNamespace(num_hidden_layers=4)
    shared = compile_step(model)
    assert [d.layer for d in shared] == [1, 3] and all(d.cache_bytes_saved > 0 for d in shared), shared
    deeper = CachedModel(n=6)
    deeper.config = SimpleNamespace(num_hidden_layers=6)
    shared = compile_step(model, deeper)
    assert shared and all(d.cache_bytes_saved == 0 and "count is not known" in d.note for d in shared), shared


def _tail(model, x, pos, layer):
    """A compiled helper that runs one layer of the model it is handed, computing that layer's indexer."""
    block = model.layers[layer]
    return block(x, pos, block.indexer(x, pos))


def _one_block(block, x, pos):
    return block(x, pos, block.indexer(x, pos))


@pytest.mark.parametrize("layer, fails", [(1, True), (0, False)])
def test_a_compiled_function_is_bound_by_the_models_choices(layer, fails):
    """The ledger names a layer by its number, not the path a graph reached it by (``layers.1.indexer`` from the
    model, ``L.model.layers.1.indexer`` from a function), and a function's writes go to the model it holds."""
    model = CachedModel()
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    _steps(_compiled(model, backend))  # whole-model graphs: layers 1 and 3 drop their writes
    x = torch.randn(1, D)
    helper = torch.compile(_tail, backend=backend)
    with torch.no_grad():
        if fails:
            with pytest.raises(Exception, match=r"CacheWriteConflict: .*layer 1 .* dropped its indexer key-cache"):
                helper(model, x, 7, layer)
        else:
            torch.testing.assert_close(helper(model, x, 7, layer), _tail(model, x, 7, layer))


def test_a_block_handed_alone_is_checked_against_every_models_drops():
    """A block compiled alone has no layer number and no model: it may be any model's dropped layer, so it fails
    where some model of the session dropped writes, and runs where none did."""
    model = CachedModel()
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    _steps(_compiled(model, backend))
    x = torch.randn(1, D)
    with torch.no_grad(), pytest.raises(Exception, match=r"CacheWriteConflict: .*layer is unknown"):
        torch.compile(_one_block, backend=backend)(model.layers[1], x, 7)
    torch._dynamo.reset()
    fresh = fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")
    with torch.no_grad():
        torch.compile(_one_block, backend=fresh)(model.layers[1], x, 7)
    assert [d.action.value for report in fresh.reports for d in report.decisions] == ["computed"]
