"""Property test (issue 25, item 6): DSA programs in many styles, and every claim the pass makes is the engines'.

Hypothesis draws a stack (dense, DSA and two-indexer layers in any order), a style (the indexer inside its
layer, indexers in their own list, functional code with no module path), a graph break anywhere or none, a
route (compile, export with or without module paths) and the keys (freq/offset, a pattern, a stated layer
count). Whatever the pass decides, per layer:

* a layer it says shares (a report's "shared" row, or a cross-graph read in ``layer_calls``) reads exactly the
  layer the engines' one-buffer rule names, and that layer holds a single indexer;
* the compiled output equals the hand-written model run with exactly those layers sharing (every other layer
  computing: the untouched model there);
* a graph whose layer index is unknown shares nothing and its report says why;
* and where the numbering is provable (module paths, or one indexer per layer with a stated count, in one
  graph) every S layer with a usable source does share: the property cannot pass by computing everything.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import fx_indexcache as fic
from fx_indexcache.rewrite.indices_io import CallAction
from hybrid_programs import HybridDSA, inputs

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@st.composite
def programs(draw):
    n = draw(st.integers(3, 7))
    kinds = "".join(draw(st.lists(st.sampled_from("ddiii2"), min_size=n, max_size=n)))
    assume("i" in kinds)
    key_kind = draw(st.sampled_from(["freq", "freq+count", "pattern"]))
    if key_kind == "pattern":
        keys = {"index_topk_pattern": "".join(draw(st.lists(st.sampled_from("FSS"), min_size=n, max_size=n)))}
    else:
        keys = {"index_topk_freq": draw(st.integers(2, 4)), "index_skip_topk_offset": draw(st.integers(1, 3))}
        if key_kind == "freq+count":
            keys["num_layers"] = n
    return {
        "kinds": kinds,
        "style": draw(st.sampled_from(["in_layer", "indexer_list", "functional"])),
        "break_at": draw(st.sampled_from([None, None, *range(1, n)])),
        "route": draw(st.sampled_from(["compile", "compile", "export", "export_no_paths"])),
        "keys": keys,
    }


def _engine_sources(config, kinds: str) -> dict[int, int]:
    """The engines' one-buffer rule over every indexed layer (one indexer or two)."""
    return config.buffer_sources([i for i, kind in enumerate(kinds) if kind != "d"])


def _provable_sources(program, config) -> dict[int, int] | None:
    """The sharing the pass must do inside each graph where the numbering is provable; None where it need not.

    Module paths number every graph; without them only one whole graph with one indexer per layer and a stated
    count is numbered. Inside a graph, an S layer shares with the nearest single-indexer layer that computes in
    it; the first indexed layers of a graph after a break may have their source before it, so they need not."""
    kinds, n = program["kinds"], len(program["kinds"])
    paths = program["style"] != "functional" and program["route"] != "export_no_paths"
    counted = "num_layers" in program["keys"] or "index_topk_pattern" in program["keys"]
    broken = program["break_at"] is not None and program["route"] == "compile"
    if not (paths or (counted and set(kinds) == {"i"} and not broken)):
        return None
    cuts = [0, program["break_at"], n] if broken else [0, n]
    sources = {}
    for start, stop in zip(cuts, cuts[1:]):
        writer, known = None, start == 0  # after a break, what computed before is not known in this graph
        for layer in range(start, stop):
            if kinds[layer] == "d":
                continue
            if config.layer_kind(layer) == "F":
                writer, known = (layer if kinds[layer] == "i" else None), True
            elif writer is not None and kinds[layer] == "i":
                sources[layer] = writer
            elif writer is None and known and kinds[layer] == "i":
                writer = layer  # nothing computed before it: it computes and serves the next ones
    return sources


def _run(program, model):
    keys = program["keys"]
    if program["route"] == "compile":
        backend = fic.IndexCacheEagerBackend(**keys)
        with torch.no_grad():
            out = torch.compile(model, backend=backend)(inputs())
        reads = {c.layer: c.source_layer for c in fic.layer_calls(model, backend) if c.action is CallAction.READ}
        return out, backend.reports, reads
    with torch.no_grad():
        program_ = torch.export.export(model, (inputs(),), strict=False)
    if program["route"] == "export_no_paths":
        for node in program_.graph.nodes:
            node.meta.pop("nn_module_stack", None)
    session = fic.IndexCacheSession("export")
    fic.apply_index_cache_to_exported_program(program_, session=session, **keys)
    with torch.no_grad():
        return program_.module()(inputs()), session.reports(), {}


@SETTINGS
@given(program=programs(), seed=st.integers(0, 2))
@example(program={"kinds": "didididi", "style": "indexer_list", "break_at": None, "route": "compile",
                  "keys": {"index_topk_freq": 4, "index_skip_topk_offset": 2}}, seed=0)
@example(program={"kinds": "didididi", "style": "functional", "break_at": None, "route": "compile",
                  "keys": {"index_topk_freq": 4, "index_skip_topk_offset": 2, "num_layers": 8}}, seed=0)
@example(program={"kinds": "i2ii", "style": "functional", "break_at": None, "route": "export",
                  "keys": {"index_topk_pattern": "FSFS"}}, seed=1)
@example(program={"kinds": "iiiiii", "style": "in_layer", "break_at": 3, "route": "compile",
                  "keys": {"index_topk_pattern": "FSSSSF"}}, seed=2)
@example(program={"kinds": "i2ddddi", "style": "in_layer", "break_at": 2, "route": "compile",  # a two-indexer F
                  "keys": {"index_topk_freq": 2, "index_skip_topk_offset": 2}}, seed=0)  # layer writes the buffer
def test_every_claim_is_the_engines_and_the_output_follows_the_claims(program, seed):
    torch._dynamo.reset()
    kinds = program["kinds"]
    config = fic.IndexCacheConfig.from_options(program["keys"])[0]
    model = HybridDSA(kinds, program["style"], program["break_at"], seed=seed)
    out, reports, reads = _run(program, model)

    shared = {d.layer: d.source_layer for r in reports for d in r.decisions if d.action == "shared"}
    assert not set(shared) & set(reads), "a layer both shared inside its graph and read across graphs"
    claims = {**shared, **reads}
    engine = _engine_sources(config, kinds)
    for layer, source in claims.items():
        assert engine.get(layer) == source and kinds[source] == "i" and kinds[layer] == "i", (layer, source)
    for report in reports:
        if report.layer_index_unknown is not None:
            assert report.indexers_removed == 0 and all(d.marked == "?" for d in report.decisions)
            assert report.layer_index_unknown.value in report.format()

    uses = [claims.get(layer, layer) for layer in range(len(kinds))]
    with torch.no_grad():
        torch.testing.assert_close(out, model(inputs(), uses), rtol=1e-5, atol=1e-5)

    provable = _provable_sources(program, config)
    if provable is not None:  # reads across a break may add to these, never take away
        assert provable.items() <= claims.items(), (provable, claims)
