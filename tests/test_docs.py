"""The docs a user reads first: generated benchmark tables that match the data, links that resolve, a short README."""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results_tables", ROOT / "scripts" / "results_tables.py")
results_tables = importlib.util.module_from_spec(_spec)
sys.modules["results_tables"] = results_tables  # its dataclasses look their module up there
_spec.loader.exec_module(results_tables)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_generated_table_matches_the_results_csv():
    assert results_tables.stale_docs() == []


def test_every_table_spec_is_used_and_has_data():
    rows = results_tables.read_results()
    used = {m.group("name") for doc in DOCS for m in results_tables.BLOCK.finditer(doc.read_text())}
    assert used == set(results_tables.TABLES)
    for name in results_tables.TABLES:  # a header, a rule and at least one row of data
        assert results_tables.render(name, rows).split("\n\n")[0].count("\n") >= 2


def test_a_changed_figure_makes_the_doc_stale(tmp_path):
    rows = results_tables.read_results()
    changed = [dict(row) for row in rows]
    first = next(r for r in changed if r["benchmark"] == "prefill_stack_6_layers" and r["metric"] == "ms")
    first["value"] = str(float(first["value"]) + 1.0)
    assert results_tables.stale_docs(changed) == ["docs/benchmarks.md"]


def test_rows_carry_their_provenance():
    for row in results_tables.read_results():
        assert row["device"] and row["torch"] and row["date"] and row["source"], row
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["date"]), row


def test_a_malformed_value_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=results_tables.FIELDS)
        writer.writeheader()
        writer.writerow({field: "x" for field in results_tables.FIELDS})
    with pytest.raises(ValueError, match="line 2: value 'x' is not a number"):
        results_tables.read_results(path)


def test_unknown_table_name_in_a_doc_is_an_error():
    with pytest.raises(ValueError, match="unknown results table 'nope'"):
        results_tables.refreshed("<!-- results-table: nope -->\n<!-- /results-table -->", [])


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_readme_is_a_first_contact_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings.index("## Install") < headings.index("## Use") < headings.index("## Limits")
    assert headings.index("## Limits") == headings.index("## Use") + 1  # Limits right after Use
    assert not re.search(r"\b(session|run) \d+\b", text, re.I)  # no lab notebook


def test_no_docs_are_diaries_and_none_name_a_package_index_host():
    assert not (ROOT / "docs" / "notes").exists()
    for doc in DOCS:
        text = doc.read_text()
        assert not re.search(r"pypi\.org|pythonhosted|download\.pytorch\.org|--index-url", text), doc.name


def test_a_benchmark_run_s_rows_merge_into_the_table_replacing_the_same_measurement(tmp_path):
    """``bench_environment.write_result_rows`` writes what ``results_tables.py --add`` merges: new figures are
    appended, a re-run of the same benchmark, shape, variant, metric, device and commit replaces its row."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_environment import write_result_rows
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    table = tmp_path / "results.csv"
    results_tables.write_rows(table, results_tables.read_results()[:3])
    env = dict(device="NVIDIA H100 80GB HBM3", driver="580.159.04", torch="2.11.0+cu130", triton="3.6.0",
               commit="0123456789ab", date="2026-12-05 21:00 UTC")
    run = tmp_path / "run.csv"
    values = [("decode 1×1×32768", "ours_fused_score_topk", "us", 17.5, "us"), ("decode 1×1×32768", "x", "us", None, "us")]
    assert write_result_rows(run, "indexer_vs_deepgemm", env, "benchmarks/bench_deepgemm.py", values) == 1
    assert results_tables.add_rows([run], table) == 1
    values[0] = ("decode 1×1×32768", "ours_fused_score_topk", "us", 16.0, "us")
    write_result_rows(run, "indexer_vs_deepgemm", env, "benchmarks/bench_deepgemm.py", values)
    assert results_tables.add_rows([run], table) == 0
    rows = results_tables.read_results(table)
    assert len(rows) == 4 and rows[-1]["value"] == "16" and rows[-1]["device"].endswith("driver 580.159.04")
    assert rows[-1]["commit"] == "0123456" and rows[-1]["date"] == "2026-12-05"


def test_a_dirty_tree_s_figures_keep_their_mark_and_are_refused_by_the_table(tmp_path):
    """A run on a tree that differs from its ``HEAD`` (the device machine's copy with a stale ``.git``) is written
    as ``<HEAD>-dirty``, and merging it is refused naming the line and the value: filed under the clean commit it
    would replace that commit's own figures."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_environment import short_commit, write_result_rows
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert short_commit("b7c448f46c3a5ed6cdb865559ddd8b84079b2fae-dirty") == "b7c448f-dirty"
    assert short_commit("b7c448f46c3a5ed6cdb865559ddd8b84079b2fae") == "b7c448f"
    env = dict(device="NVIDIA H100 80GB HBM3", driver="580.159.04", torch="2.11.0+cu130", triton="3.6.0",
               commit="0123456789ab-dirty", date="2026-12-05 21:00 UTC")
    run, table = tmp_path / "run.csv", tmp_path / "results.csv"
    results_tables.write_rows(table, results_tables.read_results()[:3])
    write_result_rows(run, "fused_score_topk", env, "benchmarks/bench_fused_score_topk.py",
                      [("1x1024x32K", "logits", "us", 943.0, "us")])
    assert results_tables.read_results(run)[0]["commit"] == "0123456-dirty"
    with pytest.raises(ValueError, match=r"run.csv line 2: commit '0123456-dirty'.*BENCH_COMMIT"):
        results_tables.add_rows([run], table)
    assert len(results_tables.read_results(table)) == 3
