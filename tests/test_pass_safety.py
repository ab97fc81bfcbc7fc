"""Issue 11, items 3 and 5-8: every entry point switches on alike, "off" leaves the graph alone, the
uuid covers what decides the graph, cache writes are dropped consistently across a model's graphs,
and a module name never admits a top-k the structure rejects."""

from __future__ import annotations

import copy
import dataclasses
import functools
import shutil

import pytest
import torch
from torch import nn

import fx_indexcache as fic
from dsa_programs import D, H, HD, K, T, FunctionalDSA, inputs, uses_for
from conftest import KEYED
from fx_indexcache.detection import registry as detection
from fx_indexcache.integrations import graph_pass


def _functional_graph(n: int = 4) -> torch.fx.Graph:
    with torch.no_grad():
        program = torch.export.export(FunctionalDSA(n), (inputs(),), strict=False)
    return copy.deepcopy(program.graph_module).graph


# ----------------------------------------------------------------------------- item 3
def test_pass_keys_switch_index_cache_on_like_every_entry_point():
    graph_pass_ = fic.IndexCachePass(index_topk_freq=2, index_skip_topk_offset=1)
    assert graph_pass_.config.use_index_cache
    report = fic.IndexCachePass(index_topk_freq=2, index_skip_topk_offset=1, num_layers=4,  # order needs a count
                                graph_starts_at_first_layer=True).run(_functional_graph())
    assert report.pattern == "FSFS" and report.indexers_removed == 2
    assert not fic.IndexCachePass(index_topk_freq=2, use_index_cache=False).config.use_index_cache
    assert not fic.IndexCachePass().config.use_index_cache  # no keys: the all-F default


# ----------------------------------------------------------------------------- item 5
@pytest.fixture
def fusion_calls(monkeypatch, sites_on_cuda):
    """Record whether the pass asks for the fused kernel, with every site taken for a CUDA one."""
    calls = []
    monkeypatch.setattr(graph_pass, "substitute_fused_indexer", lambda graph, sites, *precision, **options: calls.append(len(sites)) or [])
    return calls


@pytest.mark.parametrize(
    "keys, fuses",
    [
        ({"use_index_cache": False, "index_topk_freq": 2}, False),  # off: graph untouched
        ({"use_index_cache": False, "fuse_indexer_kernel": True}, True),  # asked for on its own
        ({"use_index_cache": True, "index_topk_freq": 2}, True),  # on: fuse where supported
        ({"use_index_cache": True, "fuse_indexer_kernel": False}, False),
    ],
)
def test_fused_kernel_only_when_index_cache_is_on_or_asked_for(fusion_calls, keys, fuses):
    graph = _functional_graph()
    before = len(graph.nodes)
    fic.IndexCachePass(fic.IndexCacheConfig(**keys), graph_starts_at_first_layer=True).run(graph)
    assert bool(fusion_calls) == fuses
    if not keys["use_index_cache"]:
        assert len(graph.nodes) == before


# ----------------------------------------------------------------------------- item 6
def test_uuid_covers_every_source_file_of_the_package(tmp_path):
    copy_root = tmp_path / "fx_indexcache"
    shutil.copytree(graph_pass._PACKAGE, copy_root, ignore=shutil.ignore_patterns("__pycache__"))
    digest = graph_pass._package_digest.__wrapped__  # uncached: the files change under it here
    before = digest(copy_root)
    for name in ("integrations/vllm.py", "fuse/kernels/__init__.py"):
        path = copy_root / name
        assert path.exists(), name
        path.write_text(path.read_text() + "\n# edited\n")
        after = digest(copy_root)
        assert after != before, name
        before = after


def test_uuid_covers_registered_finders():
    def finder_a(graph):
        return [], []

    def finder_b(graph):
        return [[]][0], []

    base = fic.IndexCachePass(index_topk_freq=2, context=KEYED).uuid()
    try:
        fic.register_site_finder("test.finder", finder_a)
        with_a = fic.IndexCachePass(index_topk_freq=2, context=KEYED).uuid()
        fic.register_site_finder("test.finder", finder_b)
        with_b = fic.IndexCachePass(index_topk_freq=2, context=KEYED).uuid()
    finally:
        detection.SITE_FINDERS.pop("test.finder", None)
        detection._FINDER_FINGERPRINTS.pop("test.finder", None)
    assert len({base, with_a, with_b}) == 3
    assert fic.IndexCachePass(index_topk_freq=2, context=KEYED).uuid() == base


def test_a_finder_the_uuid_cannot_cover_is_refused():
    with pytest.raises(ValueError, match="register_site_finder.*neither readable source nor bytecode"):
        fic.register_site_finder("test.opaque", functools.partial(len))
    assert "test.opaque" not in detection.SITE_FINDERS


def test_uuid_covers_whether_the_graph_starts_at_the_first_layer():
    config = fic.IndexCacheConfig(use_index_cache=True, index_topk_freq=2)
    uuids = {fic.IndexCachePass(config, context=dataclasses.replace(KEYED, starts_at_first_layer=s)).uuid()
             for s in (None, True, False)}
    assert len(uuids) == 3


# ----------------------------------------------------------------------------- item 7
class CachedStack(nn.Module):
    """DSA layers with an indexer key cache and an attention value cache per layer, written in the graph.

    ``weigh`` makes layer 1 weight its selected values by the top-k scores: then its indices
    cannot be shared, so that graph leaves layer 1 computing from its key cache.
    """

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w = nn.ParameterList(
            nn.Parameter(torch.randn(*shape, generator=gen)) for _ in range(n) for shape in
            ((D, H * HD), (D, HD), (D, H), (D, D))
        )
        self.n = n

    def forward(self, x, caches, pos: int, weigh: bool = False, uses=None):
        chosen, end = {}, pos + x.shape[0]
        for i in range(self.n):
            wq, wk, ww, wv = (self.w[4 * i + j] for j in range(4))  # no ParameterList slice: torch 2.11 cannot trace it
            index_keys, values = caches[i]
            index_keys[pos:end] = x @ wk
            values[pos:end] = x @ wv
            q = (x @ wq).unflatten(-1, (H, HD))
            score = (torch.relu(torch.einsum("shd,td->sht", q, index_keys[:end])) * (x @ ww).unsqueeze(-1)).sum(1)
            visible = torch.arange(end) <= torch.arange(x.shape[0]).unsqueeze(-1) + pos
            top = torch.where(visible, score, float("-inf")).topk(K, dim=-1)
            chosen[i] = top.indices
            picked = values[:end][chosen[uses[i]] if uses is not None else top.indices]  # [T, K, D]
            if weigh and i == 1:
                picked = picked * torch.sigmoid(top.values).unsqueeze(-1)
            x = x + torch.tanh(picked.mean(1))
        return x


def _caches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(4 * T, HD), torch.zeros(4 * T, D)) for _ in range(n)]


FSF = fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern="FSF", drop_shared_indexer_cache_writes=True)


def _cached_compile():
    """The eager ATen backend, keeping the cache writes in the graph (as Inductor does) so they can be dropped."""
    from fx_indexcache.integrations.backend import aten_graph_backend
    from fx_indexcache.detection.frames import dynamo_graph_starts_at_first_layer

    def backend(gm, example_inputs):
        graph_pass_ = fic.IndexCachePass(FSF, graph_starts_at_first_layer=dynamo_graph_starts_at_first_layer())

        def rewrite(module):
            graph_pass_(module.graph)
            module.recompile()
            return module.forward

        return aten_graph_backend(rewrite, keep_inference_input_mutations=True)(gm, example_inputs)

    return torch.compile(CachedStack(), backend=backend)


def test_a_graph_that_cannot_share_a_layer_whose_writes_were_dropped_refuses_loudly():
    compiled, caches = _cached_compile(), _caches()
    with torch.no_grad():
        compiled(inputs(1), caches, 0)  # shares layer 1 and drops its key-cache writes
        (report,) = fic.reports()
        assert report.indexers_removed == 1 and report.cache_bytes_saved == T * HD * 4
        assert torch.count_nonzero(caches[1][0]) == 0 and torch.count_nonzero(caches[0][0]) > 0
        with pytest.raises(Exception, match="earlier graph of the same model dropped its indexer key-cache writes"):
            compiled(inputs(2), caches, T, weigh=True)  # here layer 1 computes: it would read unwritten rows


def test_writes_kept_by_an_earlier_graph_stay_kept_where_a_later_graph_shares():
    compiled, caches = _cached_compile(), _caches()
    eager, reference = CachedStack(), _caches()
    with torch.no_grad():
        compiled(inputs(1), caches, 0, weigh=True)  # layer 1 cannot share: computes, writes its key cache
        eager(inputs(1), reference, 0, weigh=True)
        fic.clear_reports()
        got = compiled(inputs(2), caches, T)  # layer 1 can share, but its key cache must stay complete
        want = eager(inputs(2), reference, T, uses=uses_for(FSF, 3))
    (report,) = fic.reports()
    assert report.indexers_removed == 1 and "cache writes kept" in report.decisions[1].note
    assert report.cache_bytes_saved == 0
    torch.testing.assert_close(caches[1][0], reference[1][0], rtol=0, atol=0)  # rows T..2T written too
    assert torch.count_nonzero(caches[1][0][T: 2 * T]) > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- item 8
class ExpertIndexer(nn.Module):
    """A ReLU(x·W) expert scorer, named like an indexer: a projection whatever its name."""

    def __init__(self, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, experts))

    def forward(self, x):
        return torch.relu(x @ self.weight).topk(2, dim=-1).indices


class ExpertLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.indexer = ExpertIndexer(T)  # expert count = key-axis size, as a score over keys would have
        self.experts = nn.Parameter(torch.randn(T, D, D) * 0.3)

    def forward(self, x, chosen=None):
        chosen = self.indexer(x) if chosen is None else chosen
        return x + torch.einsum("sd,sedf->sf", x, self.experts[chosen]) / 2


class ProjectionStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(ExpertLayer() for _ in range(2))

    def forward(self, x, share: bool = False):
        first = self.layers[0].indexer(x)
        x = self.layers[0](x, first)
        return self.layers[1](x, first if share else None)


@pytest.mark.parametrize("via", ["compile", "export"])
def test_a_name_never_admits_what_the_structure_rejects(via):
    model, x = ProjectionStack(), inputs()
    with torch.no_grad():
        untouched = model(x)
        assert not torch.equal(untouched, model(x, share=True))  # taking it for an indexer would show
        if via == "compile":
            fic.clear_reports()
            compiled = torch.compile(model, backend=fic.indexcache_eager_backend, options={"index_topk_pattern": "FS"})
            got, (report,) = compiled(x), fic.reports()
        else:
            program = torch.export.export(model, (x,), strict=False)
            report = fic.apply_index_cache_to_exported_program(program, index_topk_pattern="FS")
            got = program.module()(x)
    assert report.decisions == [] and report.router_topk == 2
    notes = [n for n in report.other_notes if "multiplies a weight" in n]
    assert len(notes) == 2, report.other_notes
    torch.testing.assert_close(got, untouched, rtol=0, atol=0)
