"""Layer identity is proven or absent (issue 25, failure classes 1-3, and native sharing).

The pattern's index is the global decoder-layer index, as vLLM and SGLang number it, and an S layer reads the
nearest preceding indexed layer that computed. Written in styles the rest of the suite does not use
(``hybrid_programs``): dense layers between DSA layers, indexers kept in their own list, two indexers in one
layer, functional code and exports without module paths. Each test compares with the hand-written oracle at
the engines' semantics, or with the untouched model where the pass cannot prove the numbering.
"""

from __future__ import annotations

import itertools
import logging
import types

import pytest
import torch

import fx_indexcache as fic
from fx_indexcache.detection.registry import LayerSource, UnknownLayerIndex
from hybrid_programs import D, H, HD, K, HybridDSA, engine_uses, inputs, read, score_topk

HYBRID = "didididi"  # DSA at layers 1, 3, 5, 7 of 8: the example


def _compile(model, **keys):
    backend = fic.IndexCacheEagerBackend(**keys)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(inputs())
    return out, backend.reports


def _run(model, uses=None):
    with torch.no_grad():
        return model(inputs(), uses)


def _pairs(reports) -> dict[int, int]:
    return {d.layer: d.source_layer for r in reports for d in r.decisions if d.action == "shared"}


@pytest.mark.parametrize("style", ["in_layer", "indexer_list"])
def test_hybrid_stack_pairs_by_the_global_decoder_index(style):
    """freq 4: the engines run 3<-1 and 7<-5. Counting sites instead gave 5<-3 and 7<-3."""
    model = HybridDSA(HYBRID, style)
    out, (report,) = _compile(model, index_topk_freq=4)
    assert report.layer_source is LayerSource.MODULE_PATH
    assert [d.layer for d in report.decisions] == [1, 3, 5, 7]
    assert _pairs([report]) == {3: 1, 7: 5}
    config = fic.IndexCacheConfig(index_topk_freq=4)
    expected = _run(model, engine_uses(config, HYBRID))
    assert not torch.equal(expected, _run(model, [0, 1, 2, 3, 4, 3, 6, 3]))  # the site-count pairing would show
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert "uses layer 1's indices" in report.format()
    assert "layer 2" not in report.format().split("\n", 2)[2]  # no row for a dense layer


def test_s_layer_reads_the_nearest_computing_layer_when_its_f_layer_is_dense():
    """DSA at 2, 4, 6 (a V4-like layout): freq 4 marks F at 0, 1, 5 (dense); 4 and 6 read layer 2."""
    kinds = "ddididi"
    model = HybridDSA(kinds)
    out, (report,) = _compile(model, index_topk_freq=4)
    assert _pairs([report]) == {4: 2, 6: 2}
    torch.testing.assert_close(out, _run(model, [0, 1, 2, 3, 2, 5, 2]), rtol=0, atol=0)


def _second_call_reads(model, pattern: str):
    """The output of a second compiled call (the first compiles) and the layers it read across graphs, with the
    layer each read (read before any eager call of the model, which starts a new record)."""
    backend = fic.IndexCacheEagerBackend(index_topk_pattern=pattern)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend=backend)
        compiled(inputs())
        out = compiled(inputs())
    return out, {call.layer: call.source_layer for call in backend.layer_calls(model) if call.action.name == "READ"}


@pytest.mark.parametrize("style", ["in_layer", "indexer_list"])
@pytest.mark.parametrize("kinds, pattern, break_at", [
    ("ididii", "FFSFFS", 2),  # layer 1 (dense) marked F between layer 0 and its reader 2, the break before 2
    ("iddiii", "FFFSFS", 3),  # two dense layers between, both marked F
    ("didiid", "FFSSFS", 3),  # the break inside a run of S layers, a dense first layer
])
def test_across_a_graph_break_an_s_layer_reads_the_last_f_layer_that_ran(style, kinds, pattern, break_at):
    """The engines' one buffer across graphs: an S layer reads the last indexer layer that computed, whatever
    dense layers (marked F or not) lie between. By number, layer 2 of ididii would read dense layer 1, which
    publishes nothing, and computed where the engines share."""
    model = HybridDSA(kinds, style, break_at=break_at)
    out, reads = _second_call_reads(model, pattern)
    uses = engine_uses(fic.IndexCacheConfig(index_topk_pattern=pattern), kinds)
    torch.testing.assert_close(out, _run(model, uses), rtol=0, atol=0)
    crossing = {layer: uses[layer] for layer in range(break_at, len(kinds))
                if kinds[layer] != "d" and uses[layer] != layer and uses[layer] < break_at
                and not any(kinds[i] != "d" and uses[i] == i for i in range(break_at, layer))}
    assert crossing and reads == crossing, (reads, crossing)


class SplitLayerModel(torch.nn.Module):
    """Four DSA layers run from the top frame, a graph break inside layer 2: its first op (``layers.2.pre``) in the
    first graph, its indexer in the second (the first graph shows layer 2 without an indexer)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = HybridDSA("iiii", "in_layer").layers
        gen = torch.Generator().manual_seed(1)
        for layer in self.layers:
            layer.pre = torch.nn.Linear(D, D, bias=False)
            torch.nn.init.normal_(layer.pre.weight, std=D**-0.5, generator=gen)

    def step(self, layer, x, uses, cache):
        if uses is None or uses[layer] == layer:
            cache[layer] = self.layers[layer].indexers[0](x)
        return read(x, cache[uses[layer] if uses else layer], self.layers[layer].wv)

    def forward(self, x, uses=None):
        cache: dict = {}
        x = self.step(0, self.layers[0].pre(x), uses, cache)
        x = self.step(1, self.layers[1].pre(x), uses, cache)
        x = self.layers[2].pre(x)
        torch._dynamo.graph_break()
        x = self.step(2, x, uses, cache)
        return self.step(3, self.layers[3].pre(x), uses, cache)


@pytest.mark.parametrize("pattern, uses", [("FSSF", [0, 0, 0, 3]), ("FFSS", [0, 1, 1, 1])])
def test_a_layer_split_by_a_graph_break_still_reads_across_it(pattern, uses):
    """The first graph shows layer 2 (its first ops) without an indexer; the second holds layer 2's indexer. The
    span of the first covers layer 2, the second goes on with it: one pass, and layer 2 reads."""
    model = SplitLayerModel()
    out, reads = _second_call_reads(model, pattern)
    torch.testing.assert_close(out, _run(model, uses), rtol=0, atol=0)
    assert set(reads) == {layer for layer in range(2, 4) if uses[layer] < 2}, reads


@pytest.mark.parametrize("keys", [{"index_topk_freq": 4}, {"index_topk_freq": 4, "num_layers": 8},
                                  {"index_topk_pattern": "FFFSFFFS"}])
def test_functional_hybrid_is_never_numbered_by_site_order(keys, caplog):
    """No module path: 4 indexers in an 8-layer model (or a count nobody states) cannot be placed by order."""
    model = HybridDSA(HYBRID, "functional")
    with caplog.at_level(logging.WARNING, logger="fx_indexcache"):
        out, (report,) = _compile(model, **keys)
    assert report.layer_source is LayerSource.UNKNOWN and report.indexers_removed == 0
    counted = "num_layers" in keys or "index_topk_pattern" in keys
    assert report.layer_index_unknown is (UnknownLayerIndex.COUNT_MISMATCH if counted
                                          else UnknownLayerIndex.NO_LAYER_COUNT)
    assert any("layer index" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, _run(model), rtol=0, atol=0)


def test_functional_stack_with_a_stated_layer_count_is_numbered_by_order():
    """Every layer a DSA layer and the count stated: graph order is a proof, and the pass shares."""
    model = HybridDSA("iiii", "functional")
    out, (report,) = _compile(model, index_topk_pattern="FSFS")
    assert report.layer_source is LayerSource.WHOLE_GRAPH_ORDER and _pairs([report]) == {1: 0, 3: 2}
    torch.testing.assert_close(out, _run(model, [0, 0, 2, 2]), rtol=0, atol=0)


@pytest.mark.parametrize("strip_paths", [False, True])
def test_hybrid_export_with_and_without_module_paths(strip_paths):
    model = HybridDSA(HYBRID)
    with torch.no_grad():
        program = torch.export.export(model, (inputs(),), strict=False)
    if strip_paths:
        for node in program.graph.nodes:
            node.meta.pop("nn_module_stack", None)
    report = fic.apply_index_cache_to_exported_program(program, index_topk_freq=4)
    with torch.no_grad():
        out = program.module()(inputs())
    if strip_paths:
        assert report.layer_index_unknown is UnknownLayerIndex.NO_LAYER_COUNT
        torch.testing.assert_close(out, _run(model), rtol=0, atol=0)
    else:
        assert _pairs([report]) == {3: 1, 7: 5}
        torch.testing.assert_close(out, _run(model, engine_uses(fic.IndexCacheConfig(index_topk_freq=4), HYBRID)),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("style", ["in_layer", "functional"])
def test_two_indexers_in_one_layer_are_never_paired_across_positions(style):
    """With paths both are left alone; without, 8 indexers in a 4-layer model cannot be numbered by order. Either
    way the model runs untouched, and a pattern of 4 entries is not told to have 'at least 5'."""
    model = HybridDSA("2222", style)
    out, (report,) = _compile(model, index_topk_pattern="FSFS")
    assert report.indexers_removed == 0
    if style == "in_layer":
        assert "holds more than one indexer" in report.format()
    else:
        assert report.layer_index_unknown is UnknownLayerIndex.COUNT_MISMATCH
    torch.testing.assert_close(out, _run(model), rtol=0, atol=0)


def test_after_a_two_indexer_f_layer_s_layers_compute():
    """Layer 2 holds two indexers and is marked F: the S layer 3 after it has no source it may take."""
    model = HybridDSA("ii2i", "in_layer")
    out, (report,) = _compile(model, index_topk_pattern="FSFS")
    assert _pairs([report]) == {1: 0}
    (row,) = [d for d in report.decisions if d.layer == 3]
    assert row.action == "left as is" and "cannot serve it" in row.note
    torch.testing.assert_close(out, _run(model, [0, 0, 2, 3]), rtol=0, atol=0)


def test_pattern_of_the_wrong_length_names_the_model_layer_count():
    model = HybridDSA("iiii")
    with pytest.raises(Exception, match=r"index_topk_pattern='FSF' has 3 entries but the model has at least 4"):
        _compile(model, index_topk_pattern="FSF")


class AliasedTail(HybridDSA):
    """After its graph break the model runs a local slice of its layer list (``tail = self.layers[2:]``): the
    resume function's module paths are ``L['tail'][j]``, positions in the slice, not the model's layers."""

    def forward(self, x, uses=None):
        cache: dict = {}
        start, tail = self.break_at, self.layers[self.break_at:]
        x = self.span(x, 0, start, uses, cache)
        torch._dynamo.graph_break()
        for offset, block in enumerate(tail):
            x = block(x, None, cache, start + offset, uses)
        return x


@pytest.mark.parametrize("pattern, uses", [("FSSF", [0, 0, 0, 3]), ("FSFS", [0, 0, 2, 2])])
def test_module_paths_of_a_frame_local_are_numbered_by_identity(pattern, uses):
    """The tail's blocks are the model's layers 2 and 3. Read by their positions in the slice they took the
    characters of layers 0 and 1: under FSSF, layer 3 read layer 2's indices and layer 2 computed. They are found
    in the model's list by identity; under FSSF layer 2 then reads layer 0's indices across the break."""
    model = AliasedTail("iiii", break_at=2)
    out, reports = _compile(model, index_topk_pattern=pattern)
    head, tail = reports
    assert _pairs([head]) == {1: 0}
    assert [d.layer for d in tail.decisions] == [2, 3] and tail.layer_source is LayerSource.MODULE_PATH
    torch.testing.assert_close(out, _run(model, uses), rtol=0, atol=0)
    if pattern == "FSSF":
        assert not torch.equal(out, _run(model, [0, 0, 2, 2]))  # what the slice's numbering ran


class SecondList(HybridDSA):
    """The model loops over a second list of its DSA blocks (``self.dsa_layers``, ``self.dense_layers``): the
    traced paths are ``dsa_layers.j``, the j-th DSA layer, not the decoder layer 2j + 1."""

    def __init__(self, kinds: str) -> None:
        super().__init__(kinds)
        self.dsa_layers = torch.nn.ModuleList(self.layers[i] for i, kind in enumerate(kinds) if kind != "d")
        self.dense_layers = torch.nn.ModuleList(self.layers[i] for i, kind in enumerate(kinds) if kind == "d")

    def forward(self, x, uses=None):
        cache: dict = {}
        lists = {"d": iter(self.dense_layers), "i": iter(self.dsa_layers)}
        for layer, kind in enumerate(self.kinds):
            x = next(lists[kind])(x, None, cache, layer, uses)
        return x


@pytest.mark.parametrize("path", ["compile", "export"])
def test_a_second_list_of_the_blocks_is_numbered_by_the_list_that_owns_them(path):
    """freq 4 over DSA layers 1, 3, 5, 7: by ``dsa_layers`` positions the pass paired 2<-1 and 3<-1."""
    model = SecondList(HYBRID)
    if path == "compile":
        out, (report,) = _compile(model, index_topk_freq=4)
    else:
        with torch.no_grad():
            program = torch.export.export(model, (inputs(),))
            report = fic.apply_index_cache_to_exported_program(program, index_topk_freq=4)
            out = program.module()(inputs())
    assert report.layer_source is LayerSource.MODULE_PATH
    assert [d.layer for d in report.decisions] == [1, 3, 5, 7] and _pairs([report]) == {3: 1, 7: 5}
    torch.testing.assert_close(out, _run(model, engine_uses(fic.IndexCacheConfig(index_topk_freq=4), HYBRID)),
                               rtol=0, atol=0)


def test_a_layer_compiled_alone_does_not_number_its_own_indexers_as_layers():
    """One decoder layer with two indexers in its own list, compiled on its own: ``indexers.0`` and ``indexers.1``
    read as layers 0 and 1 made the second indexer take the first one's indices. Both score the layer's input, so
    they sit in one layer: the numbers are refused and both compute."""
    model = HybridDSA("2", seed=3).layers[0]
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FS")
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(inputs(), None, {}, 0, None)
        want = model(inputs(), None, {}, 0, None)
    (report,) = backend.reports
    assert report.layer_index_unknown is UnknownLayerIndex.PATHS_SPLIT_ONE_LAYER
    assert all(d.action == "computed" for d in report.decisions)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


class Pair(torch.nn.Module):
    def __init__(self, first, second) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([first, second])

    def forward(self, x, cache, at, uses):
        for offset, block in enumerate(self.layers):
            x = block(x, None, cache, at + offset, uses)
        return x


class Pairs(HybridDSA):
    """Decoder layers grouped in pairs, a graph break after each: one compiled pair graph whose module paths number
    its own two blocks ``layers.0`` and ``layers.1``, whichever pair it runs as."""

    def __init__(self, kinds: str) -> None:
        super().__init__(kinds)
        blocks = list(self.layers)
        del self.layers
        self.pairs = torch.nn.ModuleList(Pair(blocks[i], blocks[i + 1]) for i in range(0, len(blocks), 2))

    def forward(self, x, uses=None):
        cache: dict = {}
        for number, pair in enumerate(self.pairs):
            x = pair(x, cache, 2 * number, uses)
            torch._dynamo.graph_break()
        return x


def test_blocks_nested_in_numbered_groups_are_not_numbered_by_the_group_list():
    """freq 3 marks F S S F; the pair graph, numbered 0 and 1 by its own list, ran F S for both pairs. The blocks
    are one numbered group each in the model (``pairs.0``): the numbers are refused and every layer computes."""
    model = Pairs("iiii")
    out, reports = _compile(model, index_topk_freq=3, index_skip_topk_offset=1)
    assert reports and all(r.layer_index_unknown is UnknownLayerIndex.UNPROVEN_CONTAINER for r in reports)
    with torch.no_grad():
        torch.testing.assert_close(out, model(inputs()), rtol=0, atol=0)


class TiedIndexerStack(torch.nn.Module):
    """No module path names a layer: every layer scores its own hidden states with one indexer whose weights are
    tied across layers (``wq``, ``wk``, ``ww``), each after a projection of its own; ``chunks=2`` scores each
    layer's queries in two halves instead (two selections a layer, on one input)."""

    def __init__(self, layers: int, chunks: int = 1, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.wq, self.wk, self.ww = (torch.nn.Parameter(torch.randn(*s, generator=gen) / 2)
                                     for s in [(D, H * HD), (D, HD), (D, H)])
        self.mix = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(D, D, generator=gen) / 2)
                                          for _ in range(2 * layers))
        self.layers, self.chunks = layers, chunks

    def select(self, x):
        if self.chunks == 1:
            return score_topk(x, self.wq, self.wk, self.ww)
        half = x.shape[0] // 2
        keys = x @ self.wk
        parts = []
        for lo, hi in ((0, half), (half, x.shape[0])):
            q = (x[lo:hi] @ self.wq).unflatten(-1, (H, HD))
            score = (torch.relu(torch.einsum("shd,td->sht", q, keys)) * (x[lo:hi] @ self.ww).unsqueeze(-1)).sum(1)
            future = torch.arange(x.shape[0])[None, :] > torch.arange(lo, hi)[:, None]
            parts.append(score.masked_fill(future, float("-inf")).topk(K, dim=-1).indices)
        return torch.cat(parts)

    def forward(self, x, uses=None):
        cache: dict = {}
        for layer in range(self.layers):
            cache[layer] = self.select(torch.tanh(x @ self.mix[2 * layer]))
            x = read(x, cache[uses[layer]] if uses is not None else cache[layer], self.mix[2 * layer + 1])
        return x


def test_an_indexer_tied_across_layers_is_refused_as_a_shared_weight_not_shared_hidden_states():
    """Four indexer calls in a stated four-layer model, no module path: graph order would number them, but all four
    project with one weight, which one layer calling its indexer twice also shows. Refused, and the reason names
    the weight (an earlier message said the indexers scored the same hidden states, which they do not here)."""
    model = TiedIndexerStack(4)
    out, (report,) = _compile(model, index_topk_pattern="FSFS")
    assert report.layer_index_unknown is UnknownLayerIndex.TWO_SITES_ONE_WEIGHT
    assert "same weight" in report.format() and "_parameters['w" in report.format()
    assert "hidden states" not in report.format()
    assert all(d.action == "computed" for d in report.decisions) and report.indexers_removed == 0
    torch.testing.assert_close(out, _run(model), rtol=0, atol=0)
    assert not torch.equal(out, _run(model, [0, 0, 2, 2]))  # sharing would have shown


def test_one_layer_selecting_twice_from_its_input_is_refused_as_shared_hidden_states():
    """Two layers, each selecting for two halves of its queries: four selections in a stated four-layer model. The
    halves share the layer's hidden states and the tied weights; the hidden states are the stronger evidence (they
    change from layer to layer) and the reason names them."""
    model = TiedIndexerStack(2, chunks=2)
    out, (report,) = _compile(model, num_layers=4, index_topk_freq=2)
    assert report.layer_index_unknown is UnknownLayerIndex.TWO_SITES_ONE_INPUT
    assert "hidden states" in report.format() and "_parameters" not in report.format().split("both read")[1][:40]
    assert report.indexers_removed == 0
    torch.testing.assert_close(out, _run(model), rtol=0, atol=0)


class TowerAndDecoder(torch.nn.Module):
    """A vision tower with indexers of its own before the language model (both ``layers.N`` lists, in the given
    styles); ``config`` states the decoder's layer count in its ``text_config``, as multimodal configs do."""

    def __init__(self, tower: str, decoder: str, style: str = "in_layer", stated: bool = False) -> None:
        super().__init__()
        self.vision = HybridDSA(tower, style, seed=1)
        self.language_model = HybridDSA(decoder, style, seed=2)
        if stated:
            self.config = types.SimpleNamespace(text_config=types.SimpleNamespace(num_hidden_layers=len(decoder)))

    def forward(self, x, uses=None):
        return self.language_model(self.vision(x), uses)


@pytest.mark.parametrize("style", ["in_layer", "indexer_list"])
@pytest.mark.parametrize("tower, keys", [
    ("iiiiii", {"index_topk_pattern": "FSFS"}),  # the tower holds more indexers than the decoder
    ("ii", {"index_topk_pattern": "FSFS"}),
    ("iii", {"index_topk_freq": 2, "stated": True}),  # as many indexers: only the config's count tells them apart
])
def test_the_pattern_numbers_the_decoder_stack_not_a_tower_beside_it(style, tower, keys):
    """The decoder stack is the layer list of the model's decoder-layer count, never the one with most indexers;
    the tower's indexers are left as they are."""
    keys = dict(keys)  # the parameter's dict is shared by the style cases
    stated = keys.pop("stated", False)
    model = TowerAndDecoder(tower, "idii", style, stated)
    out, (report,) = _compile(model, **keys)
    config = fic.IndexCacheConfig(**keys)
    assert _pairs([report]) == {layer: source for layer, source in enumerate(engine_uses(config, "idii"))
                                if layer != source}
    assert sum("vision.layers" in note for note in report.other_notes) == len(tower)
    torch.testing.assert_close(out, _run(model, engine_uses(config, "idii")), rtol=0, atol=0)


@pytest.mark.parametrize("keys", [{"index_topk_pattern": "FSFS"}, {"index_topk_freq": 2}])
def test_a_tower_the_layer_count_cannot_tell_from_the_decoder_leaves_every_layer_computing(keys, caplog):
    """Four blocks each, and a count of four (or none): which list the pattern numbers is not proven."""
    model = TowerAndDecoder("iiii", "iiii")
    with caplog.at_level(logging.WARNING, logger="fx_indexcache"):
        out, (report,) = _compile(model, **keys)
    assert report.layer_index_unknown is UnknownLayerIndex.RIVAL_CONTAINERS and report.indexers_removed == 0
    assert report.format().count("layers (4 blocks)") == 2
    assert "more than one layer list" in caplog.text
    torch.testing.assert_close(out, _run(model), rtol=0, atol=0)


def test_an_exported_tower_and_decoder_number_the_decoder_by_the_pattern_length():
    model = TowerAndDecoder("iiiiii", "iiii")
    with torch.no_grad():
        program = torch.export.export(model, (inputs(),), strict=False)
    report = fic.apply_index_cache_to_exported_program(program, index_topk_pattern="FSSF")
    assert _pairs([report]) == {1: 0, 2: 0}
    with torch.no_grad():
        torch.testing.assert_close(program.module()(inputs()), _run(model, [0, 0, 0, 3]), rtol=0, atol=0)


class TowerAndBrokenDecoder(TowerAndDecoder):
    """The decoder's forward breaks the graph, so dynamo compiles the model's frame up to the decoder call: a graph
    that holds the tower alone, its list the only one in sight."""

    def __init__(self, tower: str, decoder: str) -> None:
        super().__init__(tower, decoder)
        self.language_model.break_at = 2


@pytest.mark.parametrize("tower", ["iiii", "iii"])
def test_a_graph_holding_only_a_tower_never_takes_the_decoders_pattern(tower):
    """Four tower blocks beside four decoder layers: the tower's graph is refused (another list as long is in the
    model); three: the layer count refuses it. Either way the tower runs untouched, and every decoder layer runs as
    configured (sharing layer 0's indices) or as it is."""
    model = TowerAndBrokenDecoder(tower, "iiii")
    out, reports = _compile(model, index_topk_pattern="FSSS")
    first = reports[0]  # the model's own frame up to the decoder call: the tower alone
    assert len(first.decisions) == len(tower) and first.indexers_removed == 0, first.format()
    assert first.layer_index_unknown is (UnknownLayerIndex.RIVAL_CONTAINERS if tower == "iiii"
                                         else UnknownLayerIndex.STAGE_NUMBERED_FROM_ZERO), first.format()
    candidates = [[0] + [0 if share else layer for layer, share in zip((1, 2, 3), choice)]
                  for choice in itertools.product([True, False], repeat=3)]
    assert any(torch.equal(out, _run(model, uses)) for uses in candidates)
    assert not torch.equal(_run(model, [0, 0, 0, 0]), _run(model))  # sharing shows in the output
