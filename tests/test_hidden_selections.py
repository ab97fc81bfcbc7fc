"""Indexers the detector cannot read must never be skipped as layers without one (detection/hidden.py).

The engines' one-buffer rule skips layers without an indexer, so the pass must know which layers are indexed. An
indexer run inside a higher-order op's subgraph (``torch.cond``), by an opaque op that outputs indices, on a score
an opaque op computed, on keys of unknown role, on a q·k through another activation than ReLU, or on a q·k
written as a broadcast multiply and sum is one the finders do not report as a site. A top-k is taken for a router
only where its score is read from one projection (a weight's product), as a router's or a sampler's is. Before
this rule, an F layer hidden that way was taken for a dense layer, and the next S layer was handed an earlier
layer's indices: neither the model nor the pattern asked for that.

A score computed over more keys than the top-k chooses from and cut after the product (a static buffer's empty
slots, a hand-made alignment padding) is hidden too: its top-k axis is none of the product's axes, so nothing proves
it is not a layer's indexer (before, an unnamed one was taken for a router and the same skip followed).

The stack here keeps its decoder layers in ``blocks`` (one ``Block`` each, the indexer a method of the block) and
``hide`` picks, per layer, how its indexer is hidden. The oracle runs the pattern the decisions say was executed;
every S layer that shares must take the pattern's own F layer (all layers here are indexed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_indexcache as fic
from fx_indexcache.detection.registry import LayerSource, UnknownLayerIndex

S, D, H, HD, K, LAYERS = 8, 16, 2, 8, 3, 4
PATTERN = "FSFS"


def _causal_topk(score):
    """The K best keys of each query row of an [S, T] score, later keys masked."""
    return (score + torch.full((S, S), float("-inf")).triu(1)).topk(K, dim=-1).indices


def _scores(x, wq, wk, ww):
    """[S, T] causal index scores of one unbatched row block: Σ_h w·ReLU(q·k)."""
    q, key, w = (x @ wq).view(S, H, HD), x @ wk, x @ ww
    logits = torch.einsum("shd,td->sht", q, key).relu()
    return torch.einsum("sht,sh->st", logits, w) + torch.full((S, S), float("-inf")).triu(1)


@torch.library.custom_op("fxic_hidden::lightning_topk", mutates_args=())
def lightning_topk(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, ww: torch.Tensor, k: int) -> torch.Tensor:
    """A fused indexer as a library would ship it: the whole score and top-k in one opaque op."""
    return _scores(x, wq, wk, ww).topk(k, dim=-1).indices


@lightning_topk.register_fake
def _(x, wq, wk, ww, k):
    return x.new_empty((x.shape[0], k), dtype=torch.int64)


@torch.library.custom_op("fxic_hidden::index_scores", mutates_args=())
def index_scores(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
    """A logits kernel as an opaque op (DeepGEMM's style); the top-k after it stays in the graph."""
    return _scores(x, wq, wk, ww)


@index_scores.register_fake
def _(x, wq, wk, ww):
    return x.new_empty((x.shape[0], x.shape[0]))


HIDERS = ["cond", "opaque_topk", "opaque_score", "keys_as_input", "sigmoid_score", "broadcast_score"]
#: Scores cut after their product; an exported einsum keeps the query axis, whose size matches the top-k axis, so
#: the export reads them as sites (rightly: they are indexers) where a compiled bmm hides them.
CUT_SCORES = ["sliced_score", "padded_score"]
#: Slots of a fixed-size key buffer (``sliced_score``) and the alignment ``padded_score`` pads the keys to.
SLOTS, ALIGN = 12, 16


class Block(nn.Module):
    def __init__(self, hide: str | None) -> None:
        super().__init__()
        self.hide = hide
        self.wq, self.wk = nn.Parameter(torch.randn(D, H * HD) * 0.5), nn.Parameter(torch.randn(D, HD) * 0.5)
        self.ww, self.wv = nn.Parameter(torch.randn(D, H) * 0.5), nn.Parameter(torch.randn(D, D) * 0.5)

    def select(self, x, keys_in):
        if self.hide == "cond":  # a dense fallback for short rows would sit in the other branch
            return torch.cond(x.abs().sum() >= 0, self._own_topk, self._own_topk, (x,))
        if self.hide == "opaque_topk":
            return lightning_topk(x, self.wq, self.wk, self.ww, K)
        if self.hide == "opaque_score":
            return index_scores(x, self.wq, self.wk, self.ww).topk(K, dim=-1).indices
        if self.hide == "keys_as_input":  # keys handed in whole: a graph input of unknown role
            q, w = (x @ self.wq).view(S, H, HD), x @ self.ww
            score = torch.einsum("sht,sh->st", torch.einsum("shd,td->sht", q, keys_in).relu(), w)
            return _causal_topk(score)
        if self.hide == "sigmoid_score":  # another activation over q·k: nothing proves it is not the layer's indexer
            score = torch.einsum("sht,sh->st", torch.einsum("shd,td->sht", (x @ self.wq).view(S, H, HD),
                                                            x @ self.wk).sigmoid(), x @ self.ww)
            return _causal_topk(score)
        if self.hide == "broadcast_score":  # q·k as a broadcast multiply and sum: no product op under the ReLU
            q, key, w = (x @ self.wq).view(S, H, HD), x @ self.wk, x @ self.ww
            logits = (q[:, :, None, :] * key[None, None, :, :]).sum(-1).relu()
            score = (logits * w[:, :, None]).sum(1)
            return _causal_topk(score)
        if self.hide in CUT_SCORES:  # more keys scored than chosen from, the extra ones cut after the product
            key = x @ self.wk
            if self.hide == "sliced_score":  # every slot of a static buffer, the empty ones too
                key = torch.cat([key, keys_in[: SLOTS - S]])
            else:  # keys zero-padded by hand to an aligned count
                key = F.pad(key, (0, 0, 0, ALIGN - S))
            score = torch.einsum("sht,sh->st", torch.einsum("shd,td->sht", (x @ self.wq).view(S, H, HD), key).relu(),
                                 x @ self.ww)[:, :S]
            return _causal_topk(score)
        return self._own_topk(x)

    def _own_topk(self, x):
        return _scores(x, self.wq, self.wk, self.ww).topk(K, dim=-1).indices

    def forward(self, x, keys_in, shared=None):
        own = self.select(x, keys_in)
        indices = own if shared is None else shared
        v = x @ self.wv
        return x + F.silu(v[indices].mean(1)), own


class Stack(nn.Module):
    def __init__(self, hide: dict[int, str]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(hide.get(i)) for i in range(LAYERS))

    def forward(self, x, keys_in):
        for block in self.blocks:
            x, _ = block(x, keys_in)
        return x

    def oracle(self, x, keys_in, executed: str):
        """S: the nearest preceding F's indices; any other letter computes (F also serves later S layers)."""
        source = None
        for block, mark in zip(self.blocks, executed):
            x, own = block(x, keys_in, shared=source if mark == "S" else None)
            if mark == "F":
                source = own
        return x


def _inputs():
    torch.manual_seed(1)
    return torch.randn(S, D), torch.randn(S, HD) * 0.5


def _executed(report) -> str:
    shared = {d.layer for d in report.decisions if d.action == "shared"}
    return "".join("S" if i in shared else ("F" if PATTERN[i] == "F" else "s") for i in range(LAYERS))


def _compile(model, x, keys):
    torch._dynamo.reset()
    backend = fic.IndexCacheEagerBackend(index_topk_pattern=PATTERN)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x, keys)
    (report,) = backend.reports
    return out, report


def _export(model, x, keys, strip_paths=False):
    with torch.no_grad():
        program = torch.export.export(model, (x, keys))
        if strip_paths:
            for node in program.graph_module.graph.nodes:
                node.meta.pop("nn_module_stack", None)
        report = fic.apply_index_cache_to_exported_program(program, index_topk_pattern=PATTERN, num_layers=LAYERS)
        return program.module()(x, keys), report


def _check(model, x, keys, out, report):
    """Every share takes the pattern's own F layer, and the output is the oracle of what was executed."""
    for d in report.decisions:
        if d.action == "shared":
            assert d.source_layer == PATTERN.rindex("F", 0, d.layer), d
    with torch.no_grad():
        torch.testing.assert_close(out, model.oracle(x, keys, _executed(report)), rtol=0, atol=0)


@pytest.mark.parametrize("hide", HIDERS)
@pytest.mark.parametrize("path", ["compile", "export"])
def test_a_hidden_f_layer_is_neither_source_nor_skipped(hide, path):
    model, (x, keys) = Stack({2: hide}).eval(), _inputs()
    out, report = (_compile if path == "compile" else _export)(model, x, keys)
    _check(model, x, keys, out, report)
    decisions = {d.layer: d for d in report.decisions}
    assert decisions[1].action == "shared" and decisions[1].source_layer == 0  # the visible pair still shares
    assert decisions[3].action == "left as is" and "layer 2 cannot serve it" in decisions[3].note, decisions[3]
    assert 2 not in decisions


@pytest.mark.parametrize("hide", CUT_SCORES)
@pytest.mark.parametrize("path", ["compile", "export"])
def test_a_score_cut_after_its_product_never_hands_on_an_earlier_layers_indices(hide, path):
    """Layer 2 (F) scores more keys than its top-k chooses from. Before, a compile took its top-k for a router's,
    and layer 3 got layer 0's indices; now layer 3 never does. It computes its own: where layer 2 is hidden
    (compile), and where layer 2 is read (export) because layer 2's keys reach its score through steps layer 3's do
    not take (a concatenation or pad, cut back after the product), which the frame check does not prove to name the
    same tokens."""
    model, (x, keys) = Stack({2: hide}).eval(), _inputs()
    out, report = (_compile if path == "compile" else _export)(model, x, keys)
    _check(model, x, keys, out, report)  # a share from layer 0 fails here
    third = {d.layer: d for d in report.decisions}[3]
    if path == "compile":
        assert third.action == "left as is" and "layer 2 cannot serve it" in third.note, third
        assert "top-k axis is none of that product's axes" in report.format()
    else:
        assert third.action == "left as is" and "otherwise than layer 2's" in third.note, third


@pytest.mark.parametrize("path", ["compile", "export"])
def test_without_a_hidden_layer_every_s_layer_shares(path):
    """The control: the same stack with nothing hidden shares both S layers (the tests above are not vacuous)."""
    model, (x, keys) = Stack({}).eval(), _inputs()
    out, report = (_compile if path == "compile" else _export)(model, x, keys)
    _check(model, x, keys, out, report)
    assert _executed(report) == PATTERN
    with torch.no_grad():
        assert not torch.equal(out, model(x, keys))


@pytest.mark.parametrize("hide", [*HIDERS, *CUT_SCORES])
def test_a_hidden_s_layer_costs_no_other_layer_its_share(hide):
    """A hidden layer marked S serves no one under the pattern: layer 3 still takes layer 2's indices."""
    model, (x, keys) = Stack({1: hide}).eval(), _inputs()
    out, report = _compile(model, x, keys)
    _check(model, x, keys, out, report)
    assert _executed(report) == "FsFS"


class AutocastScore(Block):
    """The score under ``torch.autocast``: an export keeps the block as a ``wrap_with_autocast`` subgraph and the
    top-k outside it; a compile inlines it."""

    def _own_topk(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            score = _scores(x, self.wq, self.wk, self.ww)
        return score.float().topk(K, dim=-1).indices


@pytest.mark.parametrize("path, executed", [("export", "FSFs"), ("compile", "FSFS")])
def test_an_autocast_score_hides_its_layer_from_an_export_only(path, executed):
    model = Stack({}).eval()
    autocast = AutocastScore(None)
    autocast.load_state_dict(model.blocks[2].state_dict())
    model.blocks[2] = autocast
    x, keys = _inputs()
    out, report = (_compile if path == "compile" else _export)(model, x, keys)
    _check(model, x, keys, out, report)
    assert _executed(report) == executed
    if path == "export":
        assert any(line.startswith("layer 2 holds a top-k of a score computed by wrap_with_autocast")
                   for line in report.other_notes)


class TwoSelections(Block):
    """A block that also runs an opaque op outputting indices (a fused router kernel's expert ids, say)."""

    def forward(self, x, keys_in, shared=None):
        y, own = super().forward(x, keys_in, shared)
        extra = lightning_topk(x, self.wq, self.wk, self.ww, 1)
        return y + x[extra[:, 0]], own


def _with_two_selections_at(layer: int) -> Stack:
    model = Stack({}).eval()
    two = TwoSelections(None)
    two.load_state_dict(model.blocks[layer].state_dict())
    model.blocks[layer] = two
    return model


def test_a_visible_indexer_beside_a_hidden_selection_is_set_aside():
    """Such a layer holds two selections: which one its attention reads is not known, so it is no source."""
    model, (x, keys) = _with_two_selections_at(2), _inputs()
    out, report = _compile(model, x, keys)
    decisions = {d.layer: d for d in report.decisions}
    assert 2 not in decisions and decisions[3].action == "left as is"
    assert any("layer 2 also holds an opaque op fxic_hidden::lightning_topk" in line for line in report.other_notes)
    with torch.no_grad():
        torch.testing.assert_close(out, model.oracle(x, keys, _executed(report)), rtol=0, atol=0)


class Indexer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk = nn.Parameter(torch.randn(D, H * HD) * 0.5), nn.Parameter(torch.randn(D, HD) * 0.5)
        self.ww = nn.Parameter(torch.randn(D, H) * 0.5)

    def forward(self, x):
        return _scores(x, self.wq, self.wk, self.ww).topk(K, dim=-1).indices


class OwnList(nn.Module):
    """Indexers kept in their own list (``indexers.N``); the model runs one of them under ``torch.cond`` from its
    own forward, so that selection's module path names no layer: its layer is not known."""

    def __init__(self, hidden_at: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden_at = hidden_at
        self.indexers = nn.ModuleList(Indexer() for _ in range(LAYERS))
        self.mix = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(LAYERS))

    def forward(self, x, keys_in, pattern: str | None = None):
        source = None
        for i, (indexer, mix) in enumerate(zip(self.indexers, self.mix)):
            if i == self.hidden_at:
                own = torch.cond(x.abs().sum() >= 0, indexer, indexer, (x,))
            else:
                own = indexer(x)
            indices = source if pattern and pattern[i] == "S" else own
            if pattern and pattern[i] == "F":
                source = own
            x = x + mix(x)[indices].mean(1)
        return x


@pytest.mark.parametrize("hidden_at, executed", [(2, "FSFs"), (1, "FsFS")])
def test_a_hidden_selection_of_unknown_layer_blocks_sources_across_it(hidden_at, executed):
    """Between a source and its S layer in graph order it blocks the share; before an F source it does not."""
    model, (x, keys) = OwnList(hidden_at).eval(), _inputs()
    torch._dynamo.reset()
    backend = fic.IndexCacheEagerBackend(index_topk_pattern=PATTERN)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x, keys)
    (report,) = backend.reports
    shared = {d.layer: d for d in report.decisions if d.action == "shared"}
    assert "".join("S" if i in shared else ("F" if PATTERN[i] == "F" else "s") for i in range(LAYERS)) == executed
    assert all(d.source_layer == PATTERN.rindex("F", 0, d.layer) for d in shared.values())
    left = [d for d in report.decisions if d.action == "left as is"]
    assert [d.layer for d in left] == ([3] if hidden_at == 2 else [])
    assert all("its layer unknown" in d.note for d in left)
    assert any("(its layer unknown) holds" in line for line in report.other_notes)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, keys, executed.replace("s", "F")), rtol=0, atol=0)


def test_graph_order_does_not_number_a_graph_that_hides_a_selection():
    """Without module paths, graph order numbers sites only when they are one a layer. Here the four visible sites
    match the four layers, but a hidden selection may be one more indexer: the layers are unknown, all compute."""
    model, (x, keys) = _with_two_selections_at(2), _inputs()
    out, report = _export(model, x, keys, strip_paths=True)
    assert report.layer_source == LayerSource.UNKNOWN and len(report.decisions) == LAYERS
    assert UnknownLayerIndex.HIDDEN_SELECTION.value in report.layer_index_unknown
    assert all(d.action == "computed" for d in report.decisions)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, keys), rtol=0, atol=0)
    control = Stack({}).eval()  # the same export with nothing hidden is numbered by graph order
    _, numbered = _export(control, x, keys, strip_paths=True)
    assert numbered.layer_source == LayerSource.WHOLE_GRAPH_ORDER


def _router(x, w_gate, bias):  # DeepSeek's group-limited routing: groups ranked by their top experts' scores
    scores = torch.sigmoid(x @ w_gate) + bias
    groups = scores.view(x.shape[0], 2, -1).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(groups).scatter(1, groups.topk(1, dim=-1).indices, 1.0)
    masked = scores.masked_fill(keep.repeat_interleave(scores.shape[1] // 2, 1) == 0, 0.0)
    return masked.topk(2, dim=-1).indices


SCORES = {
    "router": (_router, False),
    "sampler": (lambda x, w_head, _: (x @ w_head / 0.7).topk(3, dim=-1).indices, False),
    "softmax_probabilities": (lambda x, wq, wk: torch.softmax((x @ wq) @ (x @ wk).T, -1).topk(3, dim=-1).indices, True),
    "token_norms": (lambda x, wq, _: x.norm(dim=-1).topk(3).indices, True),  # no product: nothing settles it
    "broadcast_qk": (lambda x, wq, wk: ((x @ wq)[:, None] * (x @ wk)[None]).sum(-1).relu().topk(3, dim=-1).indices,
                     True),
}


@pytest.mark.parametrize("name", SCORES)
def test_only_one_projection_settles_a_top_k_as_not_an_indexer(name):
    """A router's gate and a sampler's head are one product with a weight; any other score the finders cannot read
    (softmax probabilities, no product at all, q·k without a product op) leaves its top-k undecided, never a
    router."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fx_indexcache.detection.graph_inputs import mark_parameters, parameter_placeholders
    from fx_indexcache.detection.topk import classify_topk

    fn, undecided = SCORES[name]
    torch.manual_seed(0)
    x, a, b = torch.randn(6, 8), torch.randn(8, 8), torch.randn(8)
    b = b if name == "router" else torch.randn(8, 8)
    module = make_fx(fn, tracing_mode="fake")(x, a, b)
    placeholders = [n.name for n in module.graph.nodes if n.op == "placeholder"]
    mark_parameters(module.graph, placeholders[1:])  # x is the activation; the rest are the model's parameters
    last = [n for n in module.graph.nodes if n.target is torch.ops.aten.topk.default][-1]
    verdict = classify_topk(last, parameter_placeholders(module.graph))
    assert not verdict.is_indexer and verdict.undecided is undecided, verdict.reason
