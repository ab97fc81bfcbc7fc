"""IndexCache on the DSA models transformers ships, built tiny and random (no downloads).

For every model with a DSA lightning indexer (``hf_oracle.SPECS``):

* detection finds exactly one indexer top-k per DSA layer, in the indexer module, and leaves
  every MoE-router top-k alone (counts derived from the config);
* for several patterns the compiled model equals ``index_cache_oracle`` (indexer modules patched
  so S layers return their F layer's output) exactly, in prefill and over two decode steps with
  the model's own cache; all-F equals the untouched model;
* one Inductor run and a ``torch.export`` program agree with the oracle too.

Dynamo and AOTAutograd trace each model once (``PatternSwitchBackend`` holds one rewrite per
pattern), so the pattern × step matrix costs three traces per model. Models where the pass must
refuse (``limitation`` set) or that have no DSA indexer must come out unchanged.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch._dynamo.utils import counters

import fx_indexcache as fic
import hf_oracle as H

# Models whose dynamic-shape decode graphs cannot prove sharing are checked in test_block_and_pooled_indexers.py.
SUPPORTED = [name for name, spec in H.SPECS.items() if spec.limitation is None and spec.decode_limitation is None]
REFUSED = [name for name, spec in H.SPECS.items() if spec.limitation is not None]
OTHER = list(H.OTHER_SPECS)


def _patterns(n: int) -> dict[str, str]:
    return {
        "all-F": "F" * n,
        "FS": ("FS" * n)[:n],  # an S layer reads the F layer before it (freq 2 adds nothing new: FFS)
        "leading-S": "SF" + "S" * (n - 2),  # layer 0 marked S: nothing computed before it, so it computes
    }


def _executed(pattern: str, sources: dict[int, int], layers: list[int]) -> str:
    return "".join("S" if layer in sources else "F" for layer in layers)


@functools.lru_cache(maxsize=None)
def _matrix(name: str):
    """Trace ``name`` once, run every pattern (prefill + 2 decode steps), and the oracle for each."""
    tiny = H.TINY_DSA_MODELS[name]()
    patterns = _patterns(tiny.num_layers)
    untouched = H.prefill_and_decode(tiny.model, tiny)
    oracle, sources = {}, {}
    for key, pattern in patterns.items():
        with tiny.oracle(pattern) as shared:
            oracle[key] = H.prefill_and_decode(tiny.model, tiny)
        sources[key] = shared
    torch._dynamo.reset()
    counters.clear()
    backend = H.PatternSwitchBackend({key: {"index_topk_pattern": p} for key, p in patterns.items()})
    compiled = torch.compile(tiny.model, backend=backend)
    got = {}
    for key in patterns:
        with backend.use(key):
            got[key] = H.prefill_and_decode(compiled, tiny)
    stats = dict(counters["fx_indexcache"])
    return tiny, patterns, untouched, oracle, sources, backend, got, stats


@pytest.mark.parametrize("name", SUPPORTED)
def test_detection_one_site_per_dsa_layer_and_no_router(name):
    tiny, patterns, _, _, _, backend, _, stats = _matrix(name)
    spec = tiny.spec
    assert len(backend.detections) == 3, "prefill + two decode steps should be three graphs"
    expected_routers = tiny.expected_router_topk
    assert expected_routers > 0 and len(tiny.dsa_layers) == tiny.config.num_hidden_layers
    for detection in backend.detections:
        assert not detection.unplaced and not detection.nested_regions
        assert [site.layer for site in detection.sites] == tiny.dsa_layers
        for site in detection.sites:
            assert site.module_path.endswith(f"{site.layer}.{spec.indexer_path}"), site.module_path
        assert len(detection.ignored) == expected_routers
        for verdict in detection.ignored:
            path = _path(verdict.node)
            assert "indexer" not in path, f"an indexer top-k was left alone: {path} ({verdict.reason})"
            assert not verdict.is_indexer
    for key in patterns:
        for report in backend.reports[key]:
            assert report.router_topk == expected_routers
            assert [d.layer for d in report.decisions] == tiny.dsa_layers
    runs = len(patterns) * 3
    assert stats["graphs"] == runs
    assert stats["indexer_sites"] == runs * len(tiny.dsa_layers)
    assert stats["other_topk"] == runs * expected_routers
    assert stats["indexers_removed"] == sum(r.indexers_removed for rs in backend.reports.values() for r in rs)
    assert stats["layers_left"] == 0


def _path(node) -> str:
    from fx_indexcache.detection.layers import module_path

    return module_path(node) or ""


@pytest.mark.parametrize("key", ["all-F", "FS", "leading-S"])
@pytest.mark.parametrize("name", SUPPORTED)
def test_compiled_equals_oracle_prefill_and_decode(name, key):
    tiny, patterns, untouched, oracle, sources, backend, got, _ = _matrix(name)
    pattern = patterns[key]
    executed = _executed(pattern, sources[key], tiny.dsa_layers)
    for step, (mine, theirs) in enumerate(zip(got[key], oracle[key])):
        assert torch.equal(mine, theirs), f"{name} {pattern} step {step}: max diff {(mine - theirs).abs().max()}"
    for report in backend.reports[key]:
        assert report.pattern == executed
        for decision in report.decisions:
            assert decision.source_layer == sources[key].get(decision.layer, decision.layer)
            assert decision.action == ("shared" if decision.layer in sources[key] else "computed")
    if key == "all-F":
        assert not sources[key]
        for step, (mine, base) in enumerate(zip(got[key], untouched)):
            assert torch.equal(mine, base), f"{name} all-F differs from the untouched model at step {step}"
    else:
        assert sources[key], "pattern shares nothing: the check would be vacuous"
        # Sharing must change the output, or the equality above proves nothing.
        assert any(not torch.equal(a, b) for a, b in zip(oracle[key], untouched))
    if key == "leading-S":
        decision = backend.reports[key][0].decisions[0]
        assert decision.marked == "S" and decision.action == "computed"
        assert "no indexed layer computing before it" in decision.note


@pytest.mark.parametrize("name", SUPPORTED)
def test_inductor_equals_oracle(name):
    tiny = H.build(H.SPECS[name], num_layers=2)  # C++ codegen is the slow part: two layers suffice
    pattern = "FS"
    with tiny.oracle(pattern) as sources:
        expected = H.prefill(tiny.model, tiny)
    untouched = H.prefill(tiny.model, tiny)
    torch._dynamo.reset()
    fic.clear_reports()
    # No FX-graph-cache hit: on a hit Inductor skips post-grad passes, so there would be no report.
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled = torch.compile(tiny.model, backend=fic.indexcache_backend, options={"index_topk_pattern": pattern})
        got = H.prefill(compiled, tiny)
    (report,) = fic.reports()
    assert report.pattern == _executed(pattern, sources, tiny.dsa_layers)
    assert report.router_topk == tiny.expected_router_topk
    tolerance = 1e-5
    assert (expected - untouched).abs().max() > 100 * tolerance
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


#: Models that torch.export cannot trace, each with the exception it raises, a message fragment and why
#: (a torch or transformers limitation, not ours). Every other export error fails the test: a model
#: that stops exporting must be noticed, not skipped. Empty today: every supported model exports.
KNOWN_EXPORT_FAILURES: dict[str, tuple[type[Exception], str, str]] = {}


def _export(tiny):
    inputs = tiny.make_inputs(12)
    try:
        with torch.no_grad():
            program = torch.export.export(tiny.model, (), dict(inputs, use_cache=False), strict=False)
    except Exception as error:
        known = KNOWN_EXPORT_FAILURES.get(tiny.spec.name)
        if known is None or not isinstance(error, known[0]) or known[1] not in str(error):
            raise
        pytest.skip(f"{tiny.spec.name} does not export ({known[2]}): {type(error).__name__}")
    return program, inputs


def _run_program(program, inputs, tiny):
    result = program.module()(**inputs, use_cache=False)
    return H.output_of(result, tiny.spec)


@pytest.mark.parametrize("name", SUPPORTED)
def test_export_equals_oracle(name):
    tiny = H.TINY_DSA_MODELS[name]()
    program, inputs = _export(tiny)
    patterns = _patterns(tiny.num_layers)
    for key in ("FS", "leading-S"):  # the compiled matrix covers the rest; each copy costs seconds
        pattern = patterns[key]
        with tiny.oracle(pattern) as sources:
            expected = H.prefill(tiny.model, tiny)
        rewritten = copy.deepcopy(program)
        config = fic.IndexCacheConfig.from_hf_config(tiny.config, use_index_cache=True, index_topk_pattern=pattern,
                                                     indexer_types=None)
        report = fic.apply_index_cache_to_exported_program(rewritten, config)
        assert [d.layer for d in report.decisions] == tiny.dsa_layers
        assert report.pattern == _executed(pattern, sources, tiny.dsa_layers), key
        assert report.router_topk == tiny.expected_router_topk
        got = _run_program(rewritten, inputs, tiny)
        assert torch.equal(got, expected), f"{name} {pattern}: max diff {(got - expected).abs().max()}"


def test_export_with_grad_enabled_leaves_no_grad_indexers_alone():
    """V3.2's indexer is ``@torch.no_grad()``: exported with grad on, each indexer sits in a
    ``wrap_with_set_grad_enabled`` body; the pass must not rewrite (and the output stays intact)."""
    tiny = H.TINY_DSA_MODELS["deepseek_v32"]()
    inputs = tiny.make_inputs(12)
    program = torch.export.export(tiny.model, (), dict(inputs, use_cache=False), strict=False)
    untouched = H.prefill(tiny.model, tiny)
    config = fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern=("FS" * tiny.num_layers)[: tiny.num_layers])
    report = fic.apply_index_cache_to_exported_program(program, config)
    assert report.indexers_removed == 0
    assert len(report.other_notes) >= len(tiny.dsa_layers)  # each wrapped indexer is reported
    assert torch.equal(_run_program(program, inputs, tiny), untouched)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_model_is_left_unchanged(name):
    spec = H.SPECS[name]
    tiny = H.build(spec, num_layers=2)
    pattern = "FS"
    with tiny.oracle(pattern) as sources:
        shared = H.prefill(tiny.model, tiny)
    untouched = H.prefill(tiny.model, tiny)
    assert sources and not torch.equal(shared, untouched)
    torch._dynamo.reset()
    backend = H.PatternSwitchBackend({pattern: {"index_topk_pattern": pattern}})
    with H.dynamo_config(tiny), backend.use(pattern):
        got = H.prefill(torch.compile(tiny.model, backend=backend), tiny)
    assert torch.equal(got, untouched)
    (report,) = backend.reports[pattern]
    assert [d.layer for d in report.decisions] == tiny.dsa_layers  # found: one site per DSA layer
    assert report.router_topk == tiny.expected_router_topk
    (left,) = report.layers_left
    assert left.layer == 1 and left.marked == "S" and "differs from layer 0" in left.note


@pytest.mark.parametrize("name", OTHER)
def test_non_dsa_indexer_model_is_left_unchanged(name):
    tiny = H.build(H.OTHER_SPECS[name], num_layers=2)
    prompt = 6  # qwen4_exp graph-breaks once per query position
    with tiny.oracle("FS") as sources:
        shared = H.prefill(tiny.model, tiny, prompt)
    untouched = H.prefill(tiny.model, tiny, prompt)
    assert sources and not torch.equal(shared, untouched)
    torch._dynamo.reset()
    backend = H.PatternSwitchBackend({"FS": {"index_topk_pattern": "FS"}})
    with backend.use("FS"):
        got = H.prefill(torch.compile(tiny.model, backend=backend), tiny, prompt)
    assert torch.equal(got, untouched)
    reports = backend.reports["FS"]
    assert reports and all(not r.decisions for r in reports), "no top-k of this model is a DSA indexer"
    if len(reports) == 1:  # traced into one graph: every top-k was seen and left alone
        (report,) = reports
        indexers = len(H.indexer_modules(tiny.model, tiny.spec))
        assert report.router_topk == tiny.expected_router_topk + indexers
        named = [note for note in report.other_notes if "module path says indexer" in note]
        assert len(named) == indexers


def test_deepseek_v4_mixed_layer_types_never_a_wrong_rewrite():
    """Real V4 interleaves compressed-sparse layers (indexer) with heavily-compressed ones (none).
    With ``FFS`` on CSA/HCA/CSA, layer 2's nearest F layer (1) has no indexer: whatever the pass
    decides, the result must be the oracle's (layer 2 reuses layer 0) or the untouched model's,
    matching what the report says."""
    tiny = H.build(
        H.SPECS["deepseek_v4"],
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention", "compressed_sparse_attention"],
    )
    assert tiny.dsa_layers == [0, 2]
    pattern = "FFS"
    with tiny.oracle(pattern) as sources:
        expected = H.prefill(tiny.model, tiny)
    untouched = H.prefill(tiny.model, tiny)
    assert sources == {2: 0} and not torch.equal(expected, untouched)
    backend = H.PatternSwitchBackend({pattern: {"index_topk_pattern": pattern}})
    with backend.use(pattern):
        got = H.prefill(torch.compile(tiny.model, backend=backend), tiny)
    (report,) = backend.reports[pattern]
    assert [d.layer for d in report.decisions] == [0, 2]
    decision = report.decisions[1]
    if decision.action == "shared":
        assert decision.source_layer == 0 and torch.equal(got, expected)
    else:
        assert decision.action == "left as is" and decision.note and torch.equal(got, untouched)
