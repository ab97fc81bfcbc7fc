"""Hand-written DSA-style models whose indexers are valid but written in unusual ways.

Each model is a stack of toy sparse-attention layers: a lightning indexer (``Σ_h w·ReLU(q·k)``
plus a causal mask, then top-k over keys) picks the keys each query reads. The hand-written
oracle ``run(model, x, pattern)`` passes an F layer's indices to the S layers explicitly. Every
test checks the pass's report and the numbers: equal to the oracle where the pass shares, equal
to the unrewritten model where it must refuse.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import fx_indexcache as fic

B, S, D, H, HD, K, E = 1, 8, 16, 2, 8, 3, 4


def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)


class Indexer(nn.Module):
    """One lightning indexer; ``style`` picks how the same math is written."""

    def __init__(self, style: str, k: int = K) -> None:
        super().__init__()
        self.style, self.k = style, k
        self.wq = nn.Linear(D, H * HD, bias=False)
        self.wk = nn.Linear(D, HD, bias=False)
        self.ww = nn.Linear(D, H, bias=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, T] index scores, causal-masked."""
        q = self.wq(x).view(B, S, H, HD)
        k = self.wk(x)
        w = self.ww(x) * H**-0.5
        if self.style == "einsum":
            logits = F.relu(torch.einsum("bshd,btd->bsht", q, k) * HD**-0.5)
            score = torch.einsum("bsh,bsht->bst", w, logits)
        else:
            logits = F.relu(torch.matmul(q, k.transpose(-1, -2).unsqueeze(1)) * HD**-0.5)
            score = torch.matmul(w.unsqueeze(-2), logits).squeeze(-2)
        return score + _causal(S)

    def forward(self, x: torch.Tensor):
        score = self.scores(x)
        if self.style == "transposed":  # keys on dim -2, top-k over dim=-2, indices transposed back
            return score.transpose(-1, -2).topk(self.k, dim=-2).indices.transpose(-1, -2)
        if self.style == "int64-gather":  # int32 like V3.2, widened again for gather
            return score.topk(self.k, dim=-1).indices.to(torch.int32).to(torch.int64)
        if self.style == "values-used":  # the values weight the selected keys
            top = score.topk(self.k, dim=-1)
            return top.indices, top.values
        if self.style == "sort":  # the top-k as a sort cut to its first k keys
            return score.sort(-1, descending=True).indices[..., : self.k]
        if self.style == "argsort-stable":
            return torch.argsort(score, dim=2, descending=True, stable=True)[:, :, : self.k]
        if self.style == "sort-values-used":  # a sort whose values are read is not a top-k of indices alone
            ordered = score.sort(-1, descending=True)
            return ordered.indices[..., : self.k], ordered.values[..., : self.k]
        if self.style == "sort-tail":  # the last k of an ascending sort: the same keys, not a leading cut
            return score.sort(-1).indices[..., -self.k:]
        return score.topk(self.k, dim=-1).indices


class Router(nn.Module):
    """MoE router. ``linear``: plain gate. ``relu-mlp``: fed by a ReLU MLP whose hidden width is
    the expert count (a ReLU over a product with a dim of the top-k axis' size: only the weight
    operand tells it from a q·k score). ``scaled-relu-mlp``: the same with the MLP weight rescaled
    in the graph (``w * gain``), so the operand is a computed tensor, not a plain parameter; its
    weights are gathered from the scores (like DeepSeek's router), so the top-k values go unused."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind != "linear":
            self.up = nn.Linear(D, E, bias=False)
            self.gain = nn.Parameter(torch.ones(E))
            self.gate = nn.Linear(E, E, bias=False)
        else:
            self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x: torch.Tensor):
        if self.kind == "linear":
            logits = self.gate(x)
        elif self.kind == "relu-mlp":
            logits = self.gate(F.relu(self.up(x)))
        else:
            logits = self.gate(F.relu(x @ (self.up.weight.t() * self.gain)))
        probs = logits.softmax(-1)
        if self.kind == "scaled-relu-mlp":
            experts = probs.topk(2, dim=-1).indices
            return probs.gather(-1, experts), experts
        top = probs.topk(2, dim=-1)
        return top.values, top.indices


class Layer(nn.Module):
    def __init__(self, style: str, router: str | None, k: int = K) -> None:
        super().__init__()
        self.indexer = Indexer(style, k) if style else None
        self.wv = nn.Linear(D, D, bias=False)
        self.wo = nn.Linear(D, D, bias=False)
        self.router = Router(router) if router else None
        if router:
            self.experts = nn.Parameter(torch.randn(E, D, D) * 0.2)

    def forward(self, x: torch.Tensor, shared=None):
        """Returns (output, indices); ``shared`` replaces this layer's indices (the oracle's hook)."""
        if self.indexer is None:
            return self._moe(x), None
        picked = self.indexer(x)
        values = None
        if isinstance(picked, tuple):
            picked, values = picked
        indices = picked if shared is None else shared
        v = self.wv(x)
        selected = torch.gather(v.unsqueeze(1).expand(B, S, S, D), 2, indices.unsqueeze(-1).expand(B, S, -1, D))
        if values is None:
            attended = selected.mean(-2)
        else:
            weight = torch.nan_to_num(values, neginf=-1e4).softmax(-1)
            attended = (weight.unsqueeze(-1) * selected).sum(-2)
        return self._moe(x + self.wo(attended)), picked

    def _moe(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            return x
        gates, experts = self.router(x)
        outputs = torch.einsum("bsd,edf->bsef", x, self.experts)
        chosen = torch.gather(outputs, 2, experts.unsqueeze(-1).expand(B, S, 2, D))
        return x + (gates.unsqueeze(-1) * chosen).sum(-2)


class Toy(nn.Module):
    def __init__(self, styles, router: str | None = None, ks=None) -> None:
        super().__init__()
        ks = ks or [K] * len(styles)
        self.layers = nn.ModuleList(Layer(s, router, k) for s, k in zip(styles, ks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x, _ = layer(x)
        return x


def run(model: Toy, x: torch.Tensor, pattern: str) -> torch.Tensor:
    """The hand-written IndexCache oracle: S layers get the nearest preceding F layer's indices.

    A lowercase ``s`` is a layer marked S that computes its own indices (left as is) and, being
    marked S, serves no later layer.
    """
    source = None
    with torch.no_grad():
        for layer, mark in zip(model.layers, pattern):
            x, picked = layer(x, shared=source if mark == "S" else None)
            if mark == "F":
                source = picked
    return x


def _toy(*args, seed: int = 0, **kwargs) -> tuple[Toy, torch.Tensor]:
    torch.manual_seed(seed)
    model = Toy(*args, **kwargs).eval()
    for p in model.parameters():  # larger than default init: well-separated scores
        nn.init.normal_(p, std=0.5)
    return model, torch.randn(B, S, D)


def _compile(model: Toy, x: torch.Tensor, pattern: str):
    torch._dynamo.reset()
    fic.clear_reports()
    counters.clear()
    compiled = torch.compile(model, backend=fic.indexcache_eager_backend, options={"index_topk_pattern": pattern})
    with torch.no_grad():
        out = compiled(x)
    (report,) = fic.reports()
    return out, report


def _assert_shares(report, pattern: str, routers: int = 0) -> None:
    layers = list(range(len(pattern)))
    assert [d.layer for d in report.decisions] == layers
    assert report.pattern == pattern
    assert report.router_topk == routers
    for d in report.decisions:
        assert d.action == ("shared" if pattern[d.layer] == "S" else "computed")
        if d.action == "shared":
            assert d.nodes_removed > 0 and d.source_layer == pattern.rindex("F", 0, d.layer)


@pytest.mark.parametrize("style", ["plain", "transposed", "int64-gather", "einsum", "sort", "argsort-stable"])
def test_odd_but_valid_indexer_is_shared(style):
    model, x = _toy([style] * 4)
    pattern = "FSSF"
    out, report = _compile(model, x, pattern)
    _assert_shares(report, pattern)
    expected = run(model, x, pattern)
    assert not torch.allclose(expected, run(model, x, "FFFF")), "sharing must change the output"
    torch.testing.assert_close(out, expected)
    stats = counters["fx_indexcache"]
    assert stats["indexer_sites"] == 4 and stats["indexers_removed"] == 2 and stats["other_topk"] == 0


def test_transposed_topk_dim_differs_from_source_layer_is_left_alone():
    """Layer 1 takes its top-k over dim=-2 of a transposed score, layer 0 over dim=-1: the index
    tensors have different layouts, so layer 1 must not take layer 0's."""
    model, x = _toy(["plain", "transposed"])
    out, report = _compile(model, x, "FS")
    (d0, d1) = report.decisions
    assert d1.action == "left as is" and d1.note
    torch.testing.assert_close(out, run(model, x, "FF"))


def test_router_next_to_indexer_is_left_alone():
    model, x = _toy(["plain"] * 3, router="linear")
    pattern = "FSS"
    out, report = _compile(model, x, pattern)
    _assert_shares(report, pattern, routers=3)
    torch.testing.assert_close(out, run(model, x, pattern))


def test_relu_mlp_router_is_not_an_indexer():
    model, x = _toy(["plain"] * 2, router="relu-mlp")
    assert E == model.layers[0].router.up.out_features  # the ReLU output has the top-k axis' size
    pattern = "FS"
    out, report = _compile(model, x, pattern)
    _assert_shares(report, pattern, routers=2)
    # the ReLU(x·W) was seen and rejected for multiplying a weight, once per router
    assert len([n for n in report.other_notes if "multiplies a weight" in n]) == 2
    torch.testing.assert_close(out, run(model, x, pattern))


@pytest.mark.parametrize("with_indexers", [False, True])
def test_rescaled_relu_mlp_router_is_not_an_indexer(with_indexers):
    """``ReLU(x · (w * gain))`` multiplies two computed tensors, but ``w * gain`` reads parameters
    only: a projection. Before the fix this router was taken for an indexer and, in a model
    without indexers, layer 2's expert choice was replaced by layer 1's."""
    global E
    saved, E = E, S  # hidden width = experts = sequence length = top-k axis
    try:
        model, x = _toy(["plain" if with_indexers else None] * 3, router="scaled-relu-mlp")
        pattern = "FFS"
        out, report = _compile(model, x, pattern)
    finally:
        E = saved
    assert report.router_topk == 3
    assert [d.layer for d in report.decisions] == ([0, 1, 2] if with_indexers else [])
    assert not any("second indexer site" in note for note in report.other_notes)
    assert len([n for n in report.other_notes if "projection" in n]) == 3
    if with_indexers:
        _assert_shares(report, pattern, routers=3)
        torch.testing.assert_close(out, run(model, x, pattern))
    else:
        with torch.no_grad():
            torch.testing.assert_close(out, model(x))


def test_used_topk_values_keep_s_layers_as_they_are():
    model, x = _toy(["values-used"] * 3)
    pattern = "FSS"
    out, report = _compile(model, x, pattern)
    assert report.indexers_removed == 0
    for d in report.decisions[1:]:
        assert d.marked == "S" and d.action == "left as is" and "values are used" in d.note
    assert "values are used" in report.format()
    untouched = run(model, x, "FFF")
    assert not torch.allclose(untouched, run(model, x, pattern))  # a wrong rewrite would show
    torch.testing.assert_close(out, untouched)


def test_sort_layer_never_takes_a_topk_layers_indices():
    """A sort-cut layer marked S after a top-k F layer computes (equal sets, but another op: the tie order may
    differ), while the top-k layer after it shares; the sort layer's note names both kinds."""
    model, x = _toy(["plain", "sort", "plain", "sort"])
    out, report = _compile(model, x, "FSSF")
    assert [d.action for d in report.decisions] == ["computed", "left as is", "shared", "computed"]
    assert "aten.topk" in report.decisions[1].note and "aten.sort" in report.decisions[1].note
    assert report.decisions[2].source_layer == 0
    expected = run(model, x, "FsSF")
    assert not torch.allclose(expected, run(model, x, "FFFF"))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("style", ["sort", "argsort-stable"])
def test_sort_cut_indexers_through_export(style):
    """``torch.export`` keeps ``aten.argsort`` whole (compiled graphs decompose it into ``aten.sort``): a cut of
    either is a site there too, and the exported stack shares as the compiled one does."""
    model, x = _toy([style] * 4)
    pattern = "FSSF"
    with torch.no_grad():
        program = torch.export.export(model, (x,), strict=False)
    report = fic.apply_index_cache_to_exported_program(
        program, fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern))
    _assert_shares(report, pattern)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), run(model, x, pattern))


def test_sort_cut_indexer_through_inductor():
    """The same sharing where Inductor compiles the graph (the pass runs on its post-grad graph)."""
    model, x = _toy(["sort"] * 4)
    torch._dynamo.reset()
    fic.clear_reports()
    compiled = torch.compile(model, backend=fic.indexcache_backend, options={"index_topk_pattern": "FSSF"})
    with torch.no_grad():
        out = compiled(x)
    (report,) = fic.reports()
    _assert_shares(report, "FSSF")
    torch.testing.assert_close(out, run(model, x, "FSSF"))


@pytest.mark.parametrize("style", ["sort-values-used", "sort-tail"])
def test_sort_that_is_not_a_leading_cut_is_no_site(style):
    """Sorts whose values are read, or cut other than to their first k, are not indexer top-k: no site, no
    change (the model runs as written), however indexer-like the score."""
    model, x = _toy([style] * 3)
    out, report = _compile(model, x, "FSS")
    assert report.decisions == [] and report.indexers_removed == 0
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_sort_cut_router_is_not_an_indexer():
    """A router written as a sort cut to two experts scores with a weight: left alone beside shared indexers."""
    model, x = _toy(["sort"] * 3, router="linear")
    for layer in model.layers:
        router = layer.router

        def forward(x, router=router):
            probs = router.gate(x).softmax(-1)
            experts = probs.sort(-1, descending=True).indices[..., :2]
            return probs.gather(-1, experts), experts

        router.forward = forward
    pattern = "FSS"
    out, report = _compile(model, x, pattern)
    assert [(d.layer, d.action.value) for d in report.decisions] == [(0, "computed"), (1, "shared"), (2, "shared")]
    torch.testing.assert_close(out, run(model, x, pattern))


def test_different_k_per_layer_is_left_alone():
    model, x = _toy(["plain"] * 3, ks=[K, K + 1, K])
    out, report = _compile(model, x, "FSS")
    actions = [d.action for d in report.decisions]
    assert actions == ["computed", "left as is", "shared"]
    assert "differs from layer 0" in report.decisions[1].note
    assert report.decisions[2].source_layer == 0
    torch.testing.assert_close(out, run(model, x, "FsS"))


# ----------------------------------------------------------------------------- no module stack
def lightning_indexer(x, wq, wk, ww, k, product: str = "matmul"):
    """``product``: how q·k is written. ``torch.export`` keeps ``F.linear`` as ``aten.linear`` (compiled graphs
    decompose it into ``t`` + ``mm``), so a detector that knows only matmul-family products misses it there."""
    q = (x @ wq).view(B, S, H, HD)
    key = x @ wk
    if product == "linear":
        logits = F.relu(F.linear(q, key[0]) * HD**-0.5)  # B == 1: F.linear takes a 2-D weight
    else:
        logits = F.relu(torch.matmul(q, key.transpose(-1, -2).unsqueeze(1)) * HD**-0.5)
    score = torch.matmul((x @ ww).unsqueeze(-2) * H**-0.5, logits).squeeze(-2) + _causal(S)
    return score.topk(k, dim=-1).indices


def sparse_mix(x, indices, wv, wo):
    v = x @ wv
    selected = torch.gather(v.unsqueeze(1).expand(B, S, S, D), 2, indices.unsqueeze(-1).expand(B, S, -1, D))
    return x + selected.mean(-2) @ wo


class Functional(nn.Module):
    """All weights in one flat list, the layers a plain loop of functions: no per-layer modules."""

    def __init__(self, n: int, product: str = "matmul") -> None:
        super().__init__()
        torch.manual_seed(0)
        shapes = [(D, H * HD), (D, HD), (D, H), (D, D), (D, D)]
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(*s) * 0.5) for _ in range(n) for s in shapes)
        self.n, self.product = n, product

    def forward(self, x, pattern: str | None = None):
        source = None
        for i in range(self.n):
            wq, wk, ww, wv, wo = list(self.weights)[5 * i: 5 * i + 5]
            own = lightning_indexer(x, wq, wk, ww, K, self.product)
            indices = source if pattern and pattern[i] == "S" else own
            if not pattern or pattern[i] == "F":
                source = own
            x = sparse_mix(x, indices, wv, wo)
        return x


@pytest.mark.parametrize("product", ["matmul", "linear"])
@pytest.mark.parametrize("strip_metadata", [False, True])
def test_functional_indexer_through_export(strip_metadata, product):
    model = Functional(4, product).eval()
    x = torch.randn(B, S, D)
    with torch.no_grad():
        program = torch.export.export(model, (x,), strict=False)
    graph = program.graph_module.graph
    if strip_metadata:
        for node in graph.nodes:
            node.meta.pop("nn_module_stack", None)
    pattern = "FSFS"
    report = fic.apply_index_cache_to_exported_program(
        program, fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern)
    )
    assert report.layer_source == fic.detection.registry.LayerSource.WHOLE_GRAPH_ORDER
    _assert_shares(report, pattern)
    with torch.no_grad():
        expected = model(x, pattern)
        assert not torch.allclose(expected, model(x))
        torch.testing.assert_close(program.module()(x), expected)


@pytest.mark.parametrize("product", ["matmul", "linear"])
def test_functional_indexer_through_compile(product):
    model = Functional(3, product).eval()
    x = torch.randn(B, S, D)
    out, report = _compile(model, x, "FSF")
    _assert_shares(report, "FSF")
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, "FSF"))


def test_pass_is_idempotent_on_report_numbers():
    """Compiling twice with the same pattern gives the same decisions (no state leaks between graphs)."""
    model, x = _toy(["plain"] * 3)
    _, first = _compile(model, x, "FSF")
    _, second = _compile(model, x, "FSF")
    assert [(d.layer, d.action, d.source_layer, d.nodes_removed) for d in first.decisions] == [
        (d.layer, d.action, d.source_layer, d.nodes_removed) for d in second.decisions
    ]
    assert math.isfinite(first.flops_saved_per_token) and first.flops_saved_per_token > 0
