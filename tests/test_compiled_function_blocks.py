"""A compiled function that runs blocks it holds: numbered only where proven, and only for the blocks proven (CPU).

dynamo runs one graph for any module list of the same length (it guards the list's length, not its identity), and
closures of one code object share their graphs. So a compiled ``run(model, blocks, x)`` handed
``model.layers[0:2]`` and then ``model.layers[1:3]`` would run layers 1 and 2 as the graph decided for layers 0
and 1. The backend pins the identity of the blocks behind a graph's numbers (another list recompiles and is
numbered again) and skips Inductor's FX graph cache there; a list no model in reach holds is not numbered at all.
Each call here is checked against the hand-written IndexCache of the blocks it ran.
"""

from __future__ import annotations

import pytest
import torch
from dsa_programs import ModuleDSA, inputs

from fx_indexcache import clear_reports, reports
from fx_indexcache.integrations.backend import indexcache_eager_backend

PATTERN = "FSFS"
OPTIONS = {"index_topk_pattern": PATTERN}


def _run_blocks(blocks, x):
    for block in blocks:
        x = block(x, block.indexer(x))
    return x


def _run(model, blocks, x):
    return _run_blocks(blocks, x)


def _hand_written(blocks, first_layer: int, x):
    """IndexCache within one call: an S layer reads the last F layer computed in this call, else its own."""
    last = None
    for offset, block in enumerate(blocks):
        if PATTERN[first_layer + offset] == "F" or last is None:
            last = block.indexer(x)
        x = block(x, last)
    return x


def _numbered_layers() -> list[list[int]]:
    return [[d.layer for d in report.decisions] for report in reports()]


def _weights_as_buffers(model: ModuleDSA) -> ModuleDSA:
    """Every weight a buffer, as a quantized checkpoint may keep them: no parameter to pin."""
    for module in model.modules():
        for name, value in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, value.detach())
    return model


@pytest.mark.parametrize("weights", ["parameters", "buffers"])
def test_a_function_handed_slices_runs_each_slice_as_its_own_layers(weights):
    model = ModuleDSA(4).eval()
    if weights == "buffers":
        _weights_as_buffers(model)
        assert not list(model.parameters())
    compiled = torch.compile(_run, backend=indexcache_eager_backend, options=OPTIONS)
    clear_reports()
    with torch.no_grad():
        for first in (0, 1, 2, 1):
            blocks = model.layers[first:first + 2]
            assert torch.equal(compiled(model, blocks, inputs()), _hand_written(blocks, first, inputs())), first
    # one compile a slice (the repeated slice reuses its graph), each numbered as the model's layers
    assert _numbered_layers() == [[0, 1], [1, 2], [2, 3]]
    shared = [(d.layer, d.source_layer) for report in reports() for d in report.decisions if d.layer != d.source_layer]
    assert shared == [(1, 0), (3, 2)]


def test_a_list_no_model_in_reach_holds_is_not_numbered():
    model = ModuleDSA(4).eval()
    compiled = torch.compile(_run_blocks, backend=indexcache_eager_backend, options=OPTIONS)
    clear_reports()
    with torch.no_grad():
        for first in (2, 0):
            blocks = model.layers[first:first + 2]
            assert torch.equal(compiled(blocks, inputs()), _run_blocks(blocks, inputs()))
    assert _numbered_layers() == [[None, None]] * len(reports()) and reports()
    assert all("no model the compiled function reaches holds these blocks" in r.format() for r in reports())


def test_closures_of_one_code_over_different_slices_each_run_their_own_layers():
    model = ModuleDSA(4).eval()

    def over(first):
        blocks = model.layers[first:first + 2]

        def step(x):
            return _run(model, blocks, x)
        return step

    clear_reports()
    with torch.no_grad():
        for first in (0, 1):
            step = torch.compile(over(first), backend=indexcache_eager_backend, options=OPTIONS)
            blocks = model.layers[first:first + 2]
            assert torch.equal(step(inputs()), _hand_written(blocks, first, inputs())), first
    assert _numbered_layers() == [[0, 1], [1, 2]]


GLOBAL_MODEL = ModuleDSA(4).eval()


def _step_over_the_global_model(x):
    for block in GLOBAL_MODEL.layers:
        x = block(x, block.indexer(x))
    return x


def test_a_model_the_function_reads_as_a_global_is_numbered():
    clear_reports()
    with torch.no_grad():
        out = torch.compile(_step_over_the_global_model, backend=indexcache_eager_backend, options=OPTIONS)(inputs())
        assert torch.equal(out, _hand_written(GLOBAL_MODEL.layers, 0, inputs()))
    (report,) = reports()
    assert [(d.layer, d.source_layer) for d in report.decisions] == [(0, 0), (1, 0), (2, 2), (3, 2)]


def test_under_inductor_a_second_slice_is_rewritten_again_not_served_from_its_graph_cache():
    """The two slices' graphs are the same code; Inductor's FX graph cache would hand the second the first's
    rewrite (layer 2 reading layer 1's indices)."""
    model = ModuleDSA(4).eval()
    compiled = torch.compile(_run, backend="indexcache", options=OPTIONS)
    clear_reports()
    with torch.no_grad():
        for first in (0, 1):
            blocks = model.layers[first:first + 2]
            torch.testing.assert_close(compiled(model, blocks, inputs()), _hand_written(blocks, first, inputs()))
    assert _numbered_layers() == [[0, 1], [1, 2]]
