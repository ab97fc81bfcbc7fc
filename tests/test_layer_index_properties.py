"""Property test (issue 11): any small DSA program, any route, the pass once or twice → the configured
IndexCache where the layer index is known, the untouched model where it is not, and the reports say which.

Hypothesis draws the program (functional or module-based; module paths kept or stripped; a graph
break at a layer boundary or none; a top-k or a sort cut to k keys), the route (compile; export; export then compile), how many
times the pass runs, and the config (freq/offset, pattern, indexer_types). The expected layer
sharing is derived independently of the pass: a graph knows its layer numbers when its sites
carry module paths with them, or it is one whole graph (an export, an unbroken compile) holding one
indexer per layer of a layer count the keys state, or it was rewritten before (it then keeps what it
had). Inside a graph that knows its numbers, S layers follow the engines' one-buffer rule.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fx_indexcache as fic
from dsa_programs import FunctionalDSA, ModuleDSA, inputs
from fx_indexcache.detection.frames import dynamo_graph_starts_at_first_layer
from fx_indexcache.detection.registry import LayerSource
from fx_indexcache.integrations.backend import aten_graph_backend
from fx_indexcache.rewrite.indices_io import CallAction

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@st.composite
def programs(draw):
    n = draw(st.integers(2, 5))
    return {
        "n": n,
        "style": draw(st.sampled_from(["functional", "module"])),
        "paths": draw(st.booleans()),
        "break_at": draw(st.sampled_from([None, *range(1, n)])),
        "route": draw(st.sampled_from(["compile", "compile", "export", "export+compile"])),
        "applications": draw(st.integers(1, 2)),
        "keys": draw(index_cache_keys(n)),
        "select": draw(st.sampled_from(["topk", "topk", "sort"])),
    }


@st.composite
def index_cache_keys(draw, n):
    kind = draw(st.sampled_from(["freq", "pattern", "types"]))
    if kind == "freq":
        return {"index_topk_freq": draw(st.integers(1, 3)), "index_skip_topk_offset": draw(st.integers(1, 3))}
    first = draw(st.sampled_from("FFFS"))  # mostly a leading F, so that S layers have a source
    pattern = first + "".join(draw(st.lists(st.sampled_from("FSS"), min_size=n - 1, max_size=n - 1)))
    if kind == "pattern":
        return {"index_topk_pattern": pattern}
    return {"indexer_types": ["full" if c == "F" else "shared" for c in pattern]}


def _strip_paths(graph: torch.fx.Graph) -> None:
    for node in graph.nodes:
        node.meta.pop("nn_module_stack", None)


def _backend(config, paths: bool, applications: int):
    """``indexcache_eager_backend`` as it is, or its twin that strips module paths / runs the pass twice."""
    if paths and applications == 1:
        return fic.indexcache_eager_backend

    def backend(gm, example_inputs):
        if not paths:
            _strip_paths(gm.graph)
        graph_pass = fic.IndexCachePass(config, graph_starts_at_first_layer=dynamo_graph_starts_at_first_layer())

        def rewrite(module):
            for _ in range(applications):
                graph_pass(module.graph)
            module.recompile()
            return module.forward

        return aten_graph_backend(rewrite)(gm, example_inputs)

    return backend


def _graphs(program) -> list[tuple[list[int], bool, bool]]:
    """The layers of each graph the pass rewrites first, whether that graph knows their numbers, and whether it
    starts at the model's first layer.

    Module paths number any graph. Without them only graph order can, and only for a whole graph (an export,
    an unbroken compile) whose indexer count is the model's layer count as the keys state it (a pattern or
    indexer_types: one entry per layer): a graph before a break holds fewer indexers than the model has layers.
    """
    n, break_at = program["n"], program["break_at"]
    paths = program["style"] == "module" and program["paths"]
    counted = any(key in program["keys"] for key in ("index_topk_pattern", "indexer_types"))
    if program["route"] != "compile" or break_at is None:
        return [(list(range(n)), paths or counted, True)]  # an export is one whole graph; so is an unbroken compile
    return [(list(range(break_at)), paths, True), (list(range(break_at, n)), paths, False)]


def _expected_uses(program, config) -> list[int]:
    """Inside each numbered graph, the engines' one-buffer rule: an S layer reads the nearest preceding layer that
    computed; one with none before it computes when nothing can precede it (the graph starts at the first layer,
    or no F is marked before it), and is left as it is otherwise (its source is in an earlier graph)."""
    uses = list(range(program["n"]))
    for layers, known, starts in _graphs(program):
        if not known:
            continue
        writer = None
        for layer in layers:
            if config.layer_kind(layer) == "F" or (writer is None and (starts or config.source_layer(layer) is None)):
                writer = layer
            elif writer is not None:
                uses[layer] = writer
    return uses


def _read_across_the_break(program, config) -> set[int]:
    """The S layers after the break that read their F layer's indices from the graph before it at run time
    (tests/test_cross_graph_numbered.py): both graphs numbered and the backend's own run-time wrapper in use."""
    if program["route"] != "compile" or program["break_at"] is None or not program["paths"]:
        return set()
    if program["style"] != "module" or program["applications"] != 1:
        return set()
    start = program["break_at"]
    return {i for i in range(start, program["n"]) if config.layer_kind(i) == "S"
            and config.source_layer(i) is not None and config.source_layer(i) < start}


def _run(program, config, model, x):
    options = program["keys"]
    if program["route"] == "compile":
        compiled = torch.compile(model, backend=_backend(config, program["paths"], program["applications"]),
                                 options=None if not program["paths"] or program["applications"] > 1 else options)
        return compiled(x)
    exported = torch.export.export(model, (x,), strict=False)
    if not program["paths"]:
        _strip_paths(exported.graph)
    for _ in range(program["applications"]):
        fic.apply_index_cache_to_exported_program(exported, config)
    if program["route"] == "export":
        return exported.module()(x)
    return torch.compile(exported.module(), backend=fic.indexcache_eager_backend, options=options)(x)


def _check_reports(program, config, uses) -> None:
    """Every report row is either a known layer with its decision, or an unknown index with the reason."""
    decided = [r for r in fic.reports() if r.decisions]
    assert decided, "the pass saw no indexer"
    shared = {}
    for report in decided:
        if report.layer_index_unknown is not None:
            assert report.layer_source is LayerSource.UNKNOWN and report.indexers_removed == 0
            assert all(d.layer is None and d.marked == "?" and d.note for d in report.decisions)
            continue
        assert all(d.layer is not None for d in report.decisions)
        for d in report.decisions:
            assert d.marked == config.layer_kind(d.layer)
            if d.action == "shared":
                assert d.layer not in shared, f"layer {d.layer} shared twice"
                shared[d.layer] = d.source_layer
    got = list(range(program["n"]))
    for layer, source in shared.items():
        got[layer] = source
    assert got == uses, f"reports say layers use {got}, expected {uses}"
    unknown_graphs = [r for r in decided if r.layer_index_unknown is not None]
    runs = program["applications"] if program["route"] == "compile" else 1  # an unknown graph stays unknown
    assert len(unknown_graphs) == runs * sum(not known for _, known, _ in _graphs(program))


def _case(style, paths, break_at, route, applications, pattern, select="topk"):
    return {"n": len(pattern), "style": style, "paths": paths, "break_at": break_at, "route": route,
            "applications": applications, "keys": {"index_topk_pattern": pattern}, "select": select}


@SETTINGS
@given(program=programs(), seed=st.integers(0, 3))
@example(program=_case("functional", False, 2, "compile", 1, "FSFF"), seed=0)  # the graph break
@example(program=_case("module", False, 2, "compile", 2, "FSFS"), seed=1)  # stripped paths, pass twice
@example(program=_case("module", True, 2, "compile", 1, "FSFS"), seed=2)  # paths number the resumed graph
@example(program=_case("module", True, 1, "compile", 1, "FSSF"), seed=2)  # layers 1-2 read across the break
@example(program=_case("functional", False, None, "export", 2, "FSFS"), seed=0)  # export rewritten twice
@example(program=_case("functional", False, None, "export+compile", 1, "FSFS"), seed=3)
@example(program=_case("module", True, 1, "compile", 1, "FSSF", "sort"), seed=2)  # sort sites read across too
@example(program=_case("functional", False, None, "export", 2, "FSFS", "sort"), seed=0)
def test_configured_index_cache_or_untouched_and_the_report_says_which(program, seed):
    torch._dynamo.reset()
    fic.clear_reports()
    n = program["n"]
    model = (FunctionalDSA if program["style"] == "functional" else ModuleDSA)(n, program["break_at"], seed=seed,
                                                                              select=program["select"])
    config, _ = fic.IndexCacheConfig.from_options(program["keys"])
    x = inputs(seed + 1)
    uses = _expected_uses(program, config)
    across = _read_across_the_break(program, config)
    run_uses = [config.source_layer(i) if i in across else use for i, use in enumerate(uses)]
    with torch.no_grad():
        got = _run(program, config, model, x)
        read = {call.layer for call in fic.layer_calls(model) if call.action is CallAction.READ}
        want = model(x, run_uses)  # an eager call of the model: a new forward call, layer_calls forgets the last
    assert read == across
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _check_reports(program, config, uses)  # the compile-time reports: shared inside each graph
