"""The GPU benchmark's derived numbers (indexer share, Amdahl ideal, cross-run baselines), on made-up timings.

The benchmark itself needs a GPU; the arithmetic that turns its timings into the reported ratios does not, and a
mistake there would misreport every point.
"""

from __future__ import annotations

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_indexcache", os.path.join(ROOT, "benchmarks", "bench_gpu_indexcache.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runner(bench, tmp_path, rows, label="r1", phases=("prefill",), merge=()):
    args = SimpleNamespace(out=str(tmp_path), budget_s=60, smoke=True, run_label=label, phases=list(phases), merge=list(merge))
    r = bench.Runner(args)
    r.L = 6
    r.env = dict(card="card A", torch="2.x", triton="3.x", layers=6)
    r.rows = [dict(phase="prefill", B=1, S=1024, T=8192, point="prefill 1Kx8K", run=label) | row for row in rows]
    return r


def by_variant(derived):
    return {(d["run"], d["variant"]): d for d in derived}


def test_share_and_amdahl_ideal_follow_from_inductor_and_hand_f8(bench, tmp_path):
    # one indexer = (100 - 50) / 5 = 10 ms, so six are 60 % of the stack; FSSSFS removes four: ideal 1 / (1 - 0.4)
    r = runner(bench, tmp_path, [dict(variant="inductor", ms=100.0), dict(variant="hand_f8", ms=50.0),
                                 dict(variant="ours_f4", ms=60.0), dict(variant="hand_f4", ms=62.5)])
    d = by_variant(r.derived())
    assert d[("r1", "ours_f4")]["indexer_share"] == pytest.approx(0.6)
    assert d[("r1", "ours_f4")]["amdahl_ideal"] == pytest.approx(1 / 0.6, abs=1e-3)
    assert d[("r1", "ours_f4")]["frac_of_ideal"] == pytest.approx(1.0, abs=1e-3)
    assert d[("r1", "ours_f4")]["ours_vs_hand"] == pytest.approx(62.5 / 60.0, abs=1e-3)
    assert d[("r1", "hand_f8")]["frac_of_ideal"] == pytest.approx(1.0)  # f8's ideal is hand_f8 by construction


def test_fused_variant_gets_no_amdahl_ideal(bench, tmp_path):
    # its F layers are faster too, so IndexCache's ideal does not bound it
    r = runner(bench, tmp_path, [dict(variant="inductor", ms=100.0), dict(variant="hand_f8", ms=50.0),
                                 dict(variant="fused_f4", ms=20.0)])
    fused = by_variant(r.derived())[("r1", "fused_f4")]
    assert fused["speedup_vs_inductor"] == pytest.approx(5.0)
    assert "amdahl_ideal" not in fused


def test_a_run_without_baseline_borrows_another_runs_and_says_so(bench, tmp_path):
    first = runner(bench, tmp_path / "a", [dict(variant="inductor", ms=100.0), dict(variant="hand_f8", ms=50.0)], label="a")
    os.makedirs(tmp_path / "a", exist_ok=True)
    first.write()
    second = runner(bench, tmp_path / "b", [dict(variant="ours_f8", ms=50.0)], label="b",
                    merge=[str(tmp_path / "a" / "gpu_indexcache.json")])
    second.merge(second.args.merge)
    ours = by_variant(second.derived())[("b", "ours_f8")]
    assert (ours["base_run"], ours["share_run"]) == ("a", "a")
    assert ours["speedup_vs_inductor"] == pytest.approx(2.0)


def test_merge_refuses_another_card(bench, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(env=dict(card="card B", torch="2.x", triton="3.x", layers=6), raw=[], compiles=[], notes=[])))
    r = runner(bench, tmp_path, [])
    with pytest.raises(SystemExit, match="card"):
        r.merge([str(other)])
