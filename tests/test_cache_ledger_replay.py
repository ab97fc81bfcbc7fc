"""A graph Inductor's caches serve leaves the model's cache-write ledger as its compile would have.

The pass does not run on a graph served from Inductor's FX graph cache or AOTAutograd's cache. Before the rule
(``integrations/ledger_effects.py``), such a graph recorded no choice, so a later graph computing a layer whose
key-cache writes the served graph dropped read rows nobody wrote, where an uncached run fails loudly.

One subprocess (its own cache directory, both caches on) compiles the same model three times, each under a fresh
backend (a fresh ledger) and ``torch._dynamo.reset()``: first uncached, then served with its choices stored, then
served with the store cleared. Each time a graph break then puts layer 1 (S, its writes dropped by the
whole-model graph) in a graph without its F layer: every run must fail with ``CacheWriteConflict``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import torch

import fx_indexcache as fic
from fx_indexcache.integrations.ledger_effects import LedgerEffectsStore, effects_key, new_entries
from fx_indexcache.rewrite.cache_ledger import CacheWriteLedger, WriteChoice
from conftest import KEYED

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, shutil, sys, torch
    import fx_indexcache as fic
    from test_cache_writes_default import FSFS, CachedModel, _s_key_rows, _steps

    store = fic.IndexCacheBackend().ledger_effects.folder()
    counters = torch._dynamo.utils.counters
    results = []
    for case in ("uncached", "served", "served, store cleared"):
        if case == "served, store cleared":
            shutil.rmtree(store)
        torch._dynamo.reset()
        hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
        model, oracle = CachedModel(), CachedModel()
        backend = fic.IndexCacheBackend(index_topk_pattern="FSFS")
        compiled = torch.compile(model, backend=backend)
        diff = max((a - b).abs().max().item() for a, b in zip(_steps(compiled), _steps(oracle, uses=FSFS)))
        served = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"] - hits
        notes = [note for report in backend.reports for note in report.other_notes if "served from" in note]
        ran = sum(1 for report in backend.reports if report.decisions)
        model.break_after = 0
        try:
            _steps(compiled)
            second = "ran"
        except Exception as error:
            second = "CacheWriteConflict" if "CacheWriteConflict" in str(error) else repr(error)
        results.append({"case": case, "diff": diff, "s_rows": _s_key_rows(model), "served": served,
                        "notes": notes, "pass_ran": ran, "second": second})
    print(json.dumps(results))
    """
)


def test_a_served_graph_binds_later_graphs_as_a_compiled_one_does(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="1", TORCHINDUCTOR_AUTOGRAD_CACHE="1",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    script = tmp_path / "replay.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    uncached, served, cleared = json.loads(out.stdout.strip().splitlines()[-1])
    for result in (uncached, served, cleared):
        assert result["diff"] < 1e-5, result
        assert result["s_rows"] == 0, result  # the S layers' key-cache writes are dropped under Inductor too
        assert result["second"] == "CacheWriteConflict", result
    assert uncached["served"] == 0 and uncached["pass_ran"] >= 1
    # served: the pass did not run, and the report names the replayed choices
    assert served["served"] >= 1 and served["pass_ran"] == 0, served
    assert any("layer 1 dropped" in note and "layer 3 dropped" in note for note in served["notes"])
    # nothing stored to replay: compiled again with the caches off, so the pass ran
    assert cleared["pass_ran"] >= 1 and not cleared["notes"], cleared


def test_the_uuid_covers_the_ledger():
    """A compile's decisions depend on earlier graphs' choices: a graph compiled under another ledger is another
    cache entry."""
    model = torch.nn.Linear(2, 2)
    session = fic.IndexCacheSession("uuid")
    context = dataclasses.replace(KEYED, model=weakref.ref(model))
    graph_pass = fic.IndexCachePass(index_topk_pattern="FSFS", session=session, context=context)
    empty = graph_pass.uuid()
    session.ledger(model).record(graph_pass.config.fingerprint(), "layer 1", WriteChoice.DROPPED)
    dropped = graph_pass.uuid()
    other_scope = fic.IndexCachePass(index_topk_pattern="FFSS", session=session, context=context)
    assert empty not in (None, dropped)
    assert other_scope.uuid() == fic.IndexCachePass(index_topk_pattern="FFSS", context=context,
                                                    session=fic.IndexCacheSession("other")).uuid()


def test_stored_choices_round_trip_and_a_bad_file_reads_as_none(tmp_path):
    store = LedgerEffectsStore(tmp_path)
    ledger = CacheWriteLedger()
    before = ledger.entries()
    ledger.record("scope", "layers.1.indexer", WriteChoice.DROPPED)
    ledger.record("scope", "layers.0.indexer", WriteChoice.KEPT)
    store.save("k", new_entries(before, ledger.entries()))
    replayed = CacheWriteLedger()
    replayed.replay(store.load("k"))
    assert replayed.entries() == ledger.entries()
    assert store.load("missing") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert store.load("bad") is None
    blocked = tmp_path / "a file"
    blocked.write_text("")
    LedgerEffectsStore(blocked / "below").save("k", [])  # cannot be written: no error, nothing stored
    assert LedgerEffectsStore(blocked / "below").load("k") is None


def test_the_key_tells_graphs_inputs_and_grad_mode_apart():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    other = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    x = torch.randn(3, 2)
    key = effects_key("u", gm, [x], "")
    assert key == effects_key("u", gm, [x.clone()], "")
    assert key != effects_key("u", other, [x], "")
    assert key != effects_key("u", gm, [torch.randn(4, 2)], "")
    assert key != effects_key("v", gm, [x], "")
    with torch.no_grad():
        assert key != effects_key("u", gm, [x], "")
