"""Composite ops an export keeps whole are read by their definition (fx_indexcache/composite_ops.py).

``torch.export`` keeps ``aten.to``, ``movedim``, ``tensordot``, ``numpy_T``, ``linear``, ... where a compiled graph
of the same model holds the permutes, casts and ``mm`` they are defined by. The detector must find the same
indexers in both. The stack here is unbatched ([S, H, D] queries, a [T, D] key per layer) with its weights in a
flat list; each style writes one step of the indexer with a composite op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fx_indexcache as fic
from fx_indexcache.composite_ops import decomposes_into
from fx_indexcache.graph_utils import CASTS, CONTRACTIONS, IDENTITIES, PERMUTES, VIEW_LIKE, is_call

S, D, H, HD, K, LAYERS = 8, 16, 2, 8, 3, 4


def _index_scores(x, wq, wk, ww, style: str):
    """[S, T] causal index scores Σ_h w·ReLU(q·k), one composite op in each style."""
    n = x.shape[0]
    q, key, w = (x @ wq).view(n, H, HD), x @ wk, x @ ww
    if style == "float_cast":  # a bf16 model's usual `.float()` between the product and the ReLU
        logits = torch.matmul(q, key.T).float().relu()
        score = (logits * w.float().unsqueeze(-1)).sum(1)
    elif style == "to_dtype":
        logits = F.relu(torch.einsum("shd,td->sht", q, key).to(torch.float32))
        score = torch.einsum("sht,sh->st", logits, w.to(torch.float32))
    elif style == "tensordot_movedim":
        logits = F.relu(torch.tensordot(q, key, dims=([2], [1]))).movedim(1, 0)  # [H, S, T]
        score = (w.T.unsqueeze(-1) * logits).sum(0)
    elif style == "linear_type_as":
        logits = F.relu(F.linear(q, key)).type_as(w)
        score = (logits * w.unsqueeze(-1)).sum(1)
    elif style == "unflatten_mT":
        logits = F.relu((x @ wq).unflatten(-1, (H, HD)) @ key.mT)
        score = (w.unsqueeze(-1) * logits).sum(-2)
    else:
        raise AssertionError(style)
    return score + torch.full((n, n), float("-inf"), dtype=score.dtype).triu(1)


STYLES = ["float_cast", "to_dtype", "tensordot_movedim", "linear_type_as", "unflatten_mT"]


class FlatStack(nn.Module):
    """Weights in one list; ``pattern`` makes the hand-written IndexCache oracle."""

    def __init__(self, style: str, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        shapes = [(D, H * HD), (D, HD), (D, H), (D, D)]
        self.weights = nn.ParameterList(
            nn.Parameter((torch.randn(*shape) * 0.5).to(dtype)) for _ in range(LAYERS) for shape in shapes)
        self.style = style

    def forward(self, x, pattern: str | None = None):
        source = None
        for layer in range(LAYERS):
            wq, wk, ww, wv = list(self.weights)[4 * layer: 4 * layer + 4]
            own = _index_scores(x, wq, wk, ww, self.style).topk(K, dim=-1).indices
            indices = source if pattern and pattern[layer] == "S" else own
            if not pattern or pattern[layer] == "F":
                source = own
            values = (x @ wv).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = x + torch.gather(values, 1, indices.unsqueeze(-1).expand(-1, -1, D)).mean(1)
        return x


def _export(model, x, **kw):
    with torch.no_grad():
        return torch.export.export(model, (x,), strict=False, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", STYLES)
def test_export_keeps_composites_and_the_indexers_are_found(style, dtype):
    model, x = FlatStack(style, dtype).eval(), torch.randn(S, D).to(dtype)
    program = _export(model, x)
    composites = {str(n.target) for n in program.graph.nodes if decomposes_into(n) is not None}
    assert composites, "the export decomposed every composite op: this test would pass vacuously"
    report = fic.apply_index_cache_to_exported_program(program, index_topk_pattern="FSFS")
    assert [d.action.value for d in report.decisions] == ["computed", "shared", "computed", "shared"], composites
    with torch.no_grad():
        expected = model(x, "FSFS")
        assert not torch.equal(expected, model(x)), "the pattern changes nothing here: the test proves nothing"
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("style", ["float_cast", "tensordot_movedim"])
def test_dynamic_sequence_export_is_read_like_the_static_one(style):
    """Symbolic sizes: each composite is traced at the sizes' hints; the pass proves the rewrite on the symbols."""
    model, x = FlatStack(style, torch.float32).eval(), torch.randn(S, D)
    program = _export(model, x, dynamic_shapes=({0: torch.export.Dim("seq", min=4, max=64)},))
    symbolic = [n for n in program.graph.nodes if decomposes_into(n) is not None
                and isinstance(n.meta["val"], torch.Tensor)
                and any(isinstance(size, torch.SymInt) for size in n.meta["val"].shape)]
    assert symbolic, "no composite op has a symbolic size here: the test would pass vacuously"
    report = fic.apply_index_cache_to_exported_program(program, index_topk_pattern="FSFS")
    assert [d.action.value for d in report.decisions] == ["computed", "shared", "computed", "shared"]
    longer = torch.randn(2 * S - 3, D)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(longer), model(longer, "FSFS"), rtol=0, atol=0)


@pytest.mark.parametrize("style", STYLES)
def test_compile_and_export_find_the_same_indexers(style):
    """One dialect: the compiled graph (composites decomposed by AOTAutograd) and the export agree."""
    model, x = FlatStack(style, torch.float32).eval(), torch.randn(S, D)
    backend = fic.IndexCacheBackend(index_topk_pattern="FSFS")
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):  # a cached graph has no decisions
        compiled = torch.compile(model, backend=backend)(x)
    exported = fic.apply_index_cache_to_exported_program(_export(model, x), index_topk_pattern="FSFS")
    (compiled_report,) = backend.reports
    assert [d.action for d in compiled_report.decisions] == [d.action for d in exported.decisions]
    torch.testing.assert_close(compiled, model(x, "FSFS"))


def _call(target, *shapes, args=(), dtype=torch.float32):
    """A one-node graph calling ``target`` on placeholders of ``shapes`` (their fake values in meta)."""
    graph = fx.Graph()
    inputs = []
    for i, shape in enumerate(shapes):
        node = graph.placeholder(f"x{i}")
        node.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
        inputs.append(node)
    call = graph.call_function(target, (*inputs, *args))
    call.meta["val"] = target(*(node.meta["val"] for node in inputs), *args)
    return call


def test_each_composite_is_read_as_the_class_its_definition_belongs_to():
    aten = torch.ops.aten
    same_dtype = _call(aten.to.dtype, (4, 4), args=(torch.float32,))
    assert decomposes_into(same_dtype) == ("aten::alias",) and is_call(same_dtype, IDENTITIES)
    other_dtype = _call(aten.to.dtype, (4, 4), args=(torch.bfloat16,))
    assert is_call(other_dtype, CASTS) and not is_call(other_dtype, PERMUTES)
    moved = _call(aten.movedim.int, (2, 3, 4), args=(2, 0))
    assert is_call(moved, PERMUTES) and not is_call(moved, CONTRACTIONS)
    product = _call(aten.tensordot.default, (2, 3, 4), (5, 4), args=([2], [1]))
    assert is_call(product, CONTRACTIONS) and not is_call(product, VIEW_LIKE)
    biased = _call(aten.linear.default, (2, 4), (5, 4), (5,))  # runs an addmm, without addmm's arguments
    assert "aten::addmm" in decomposes_into(biased)
    assert is_call(biased, CONTRACTIONS) and not is_call(biased, {aten.addmm, aten.baddbmm})
    square = _call(aten.mm.default, (3, 3), (3, 3))
    chained = square.graph.call_function(aten.chain_matmul.default, ([square] * 3,))  # operands in a list
    chained.meta["val"] = torch.empty(3, 3, device="meta")
    assert decomposes_into(chained) is not None and not is_call(chained, CONTRACTIONS)
    # narrow runs a slice whose arguments (dim, start, length) are not slice's (dim, start, end): a reader of
    # slice's arguments would misread it, so it is neither class and matches nothing.
    narrowed = _call(aten.narrow.default, (6, 4), args=(0, 1, 3))
    assert decomposes_into(narrowed) is not None and not is_call(narrowed, VIEW_LIKE)
    assert decomposes_into(_call(aten.mm.default, (2, 3), (3, 4))) is None  # not composite: read by its name
    size = _call(aten.sym_size.int, (4, 4), args=(0,))
    assert decomposes_into(size) is None and not is_call(size, IDENTITIES)  # composite, but a size, not a view


@pytest.mark.parametrize("style", ["float_cast", "linear_type_as"])
def test_core_aten_export_is_rewritten_too(style):
    """``run_decompositions()`` (core ATen, what export backends lower) holds no composites: the same sharing."""
    model, x = FlatStack(style, torch.bfloat16).eval(), torch.randn(S, D).to(torch.bfloat16)
    program = _export(model, x).run_decompositions()
    assert not any(decomposes_into(n) for n in program.graph.nodes)
    report = fic.apply_index_cache_to_exported_program(program, index_topk_pattern="FSFS")
    assert [d.action.value for d in report.decisions] == ["computed", "shared", "computed", "shared"]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x, "FSFS"), rtol=0, atol=0)


def test_a_composite_is_read_under_an_active_fake_mode():
    """Post-grad passes run under the compile's fake mode; the trace on meta tensors must not mix with it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    moved = _call(torch.ops.aten.movedim.int, (2, 3, 4), args=(2, 0))
    with FakeTensorMode():
        assert decomposes_into(moved) == ("aten::permute",)


def test_rewritten_export_saves_and_loads(tmp_path):
    """What the reading leaves in node.meta does not stop ``torch.export.save``; the loaded program still shares."""
    model, x = FlatStack("tensordot_movedim", torch.float32).eval(), torch.randn(S, D)
    program = _export(model, x)
    fic.apply_index_cache_to_exported_program(program, index_topk_pattern="FSFS")
    torch.export.save(program, tmp_path / "program.pt2")
    loaded = torch.export.load(tmp_path / "program.pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), model(x, "FSFS"), rtol=0, atol=0)


def test_layers_of_one_shape_trace_each_composite_once():
    """The graph's memo: the four layers' composites are traced once per op and input signature."""
    from fx_indexcache.composite_ops import _MEMO_ATTRIBUTE

    program = _export(FlatStack("linear_type_as", torch.float32).eval(), torch.randn(S, D))
    read = [n for n in program.graph.nodes if decomposes_into(n) is not None]
    traces = program.graph.__dict__[_MEMO_ATTRIBUTE]
    assert len(read) >= 4 * len(traces) > 0, (len(read), len(traces))
