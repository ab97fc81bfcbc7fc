"""The docs' benchmark tables, generated from the one results table, ``benchmarks/results/results.csv``.

Every figure the README and docs/ cite is one row of that CSV (benchmark, shape, variant, metric, value, with
the device, torch, Triton and date of its measurement, and its source: the file the figure was first recorded
in, and the commit whose tree holds that file, so ``git show COMMIT:SOURCE`` shows the raw run). A doc holds a generated table between
``<!-- results-table: NAME -->`` and ``<!-- /results-table -->``; this script rewrites those blocks from the
CSV, and ``--check`` (what the tests run) fails when a doc and the data disagree.

    python scripts/results_tables.py          # rewrite the blocks in README.md and docs/*.md
    python scripts/results_tables.py --check  # exit 1, naming the tables, when any block is stale
    python scripts/results_tables.py --add OUT/results_rows.csv  # a benchmark run's rows into the table

A benchmark run on the GPU machine writes its rows as a CSV of the same columns into its output folder (the
machine's copy of the checkout does not come back); ``--add`` merges them here: a row of the same benchmark,
shape, variant, pattern, metric, device and commit is replaced, never duplicated.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "results.csv"
FIELDS = ["benchmark", "shape", "variant", "pattern", "metric", "value", "unit", "device", "torch", "triton",
          "date", "commit", "source"]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- results-table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results-table -->)", re.S)


@dataclasses.dataclass(frozen=True)
class Column:
    header: str
    cells: tuple[tuple[str, str], ...]  # (variant, metric) of each value the cell shows, in order
    fmt: str = ".3f"
    suffix: str = ""
    with_pattern: bool = False  # append the first value's pattern, as `FSSS`


@dataclasses.dataclass(frozen=True)
class Table:
    benchmark: str
    row_header: str
    columns: tuple[Column, ...]
    commit: str = ""  # one run's rows only, where the benchmark holds several runs of the same shapes


def _speedups(variants: tuple[str, ...], fmt: str = ".2f") -> tuple[Column, ...]:
    return tuple(Column(v, ((v, "speedup_vs_inductor"),), fmt, "×") for v in variants)


def _triple(header: str, variants: tuple[str, ...], metric: str, fmt: str = ".3f") -> Column:
    return Column(header, tuple((v, metric) for v in variants), fmt)


F248 = ("ours_f2", "ours_f4", "ours_f8")

TABLES: dict[str, Table] = {
    "headline": Table("transformers_v32_prefill", "prompt", (
        Column("Inductor, all layers F", (("inductor", "ms"),), ".1f", " ms"),
        Column("ours f4, unfused", (("ours_f4_unfused", "ms"),), ".1f", " ms"),
        Column("ours f4, fused kernels", (("ours_f4_fused", "ms"),), ".1f", " ms"),
    )),
    "prefill-stack": Table("prefill_stack_6_layers", "chunk × context", (
        Column("Inductor ms", (("inductor", "ms"),), ".1f"),
        Column("indexer share", (("inductor", "indexer_share"),)),
        *_speedups(F248),
        _triple("of ideal (f2/f4/f8)", F248, "of_ideal"),
        _triple("vs hand (f2/f4/f8)", F248, "vs_hand"),
        *_speedups(("fused_f4",)),
    )),
    "decode-cudagraphs": Table("decode_cudagraphs_6_layers", "decode point", (
        Column("Inductor ms", (("inductor", "ms"),), ".2f"),
        Column("indexer share", (("inductor", "indexer_share"),)),
        *_speedups(F248),
        _triple("of ideal (f2/f4/f8)", F248, "of_ideal"),
        _triple("vs hand (f2/f4/f8)", F248, "vs_hand"),
    )),
    "decode-cudagraphs-streamed": Table("decode_cudagraphs_streamed", "decode point", (
        Column("ours_f4 of ideal", (("ours_f4", "of_ideal"),)),
        Column("ours_f4 vs hand (synced / streamed)", (("ours_f4", "vs_hand"), ("ours_f4", "vs_hand_streamed"))),
        Column("ours_f8 of ideal", (("ours_f8", "of_ideal"),)),
        Column("ours_f8 vs hand (synced / streamed)", (("ours_f8", "vs_hand"), ("ours_f8", "vs_hand_streamed"))),
    )),
    "decode-cudagraphs-drop": Table("decode_cudagraphs_drop_writes", "decode point", (
        _triple("vs hand, streamed: ours_f4 / ours_f4_drop", ("ours_f4", "ours_f4_drop"), "vs_hand_streamed"),
        _triple("ours_f8 / ours_f8_drop", ("ours_f8", "ours_f8_drop"), "vs_hand_streamed"),
    )),
    "generate": Table("generate_4_layers", "prompt", (
        _triple("prefill s: Inductor / ours_f4 / ours_f4 fused", ("inductor", "ours_f4", "ours_f4_fused"),
                "prefill_s"),
        Column("decode tok/s: Inductor / ours_f4 / ours_f4 fused",
               (("inductor", "decode_tok_s"), ("ours_f4", "decode_tok_s"), ("ours_f4_fused", "decode_tok_s")), ".1f"),
    )),
    "topk": Table("topk_k2048", "top-k alone, rows × keys", (
        _triple("CUDA kernel unsorted / sorted ms", ("cuda", "cuda_sorted"), "ms"),
        _triple("Triton unsorted / sorted", ("triton", "triton_sorted"), "ms"),
        _triple("torch.topk unsorted / sorted", ("torch", "torch_sorted"), "ms"),
    )),
    "logits-topk-prefill": Table("logits_topk_prefill", "B × S × T", (
        Column("logits ms", (("logits", "ms"),)),
        Column("logits floor", (("logits_floor", "ms"),)),
        Column("+ our top-k unsorted / sorted", (("ours_unsorted", "ms"), ("ours_sorted", "ms"))),
        Column("+ torch.topk sorted", (("torch_sorted", "ms"),)),
    )),
    "logits-topk-decode": Table("logits_topk_decode_cudagraph", "B × T", (
        Column("logits µs", (("logits", "us"),), ".1f"),
        _triple("+ our top-k unsorted / sorted µs", ("ours_unsorted", "ours_sorted"), "us", ".1f"),
        _triple("+ torch.topk unsorted / sorted µs", ("torch_unsorted", "torch_sorted"), "us", ".1f"),
    )),
    "fp8": Table("indexer_fp8", "B × S × T", (
        Column("bf16 logits µs", (("bf16", "us"),), ".0f"),
        Column("fp8 kernel, keys already fp8 µs", (("fp8_kernel", "us"),), ".0f"),
        Column("fp8 op, quantising q and k per call µs", (("fp8_op", "us"),), ".0f"),
        Column("agreement of selected sets", (("fp8_op", "set_agreement"),)),
    )),
    "fused-score-topk": Table("fused_score_topk", "B × S × T", (
        Column("logits µs", (("logits", "us"),), ".1f"),
        Column("logits + top-k µs", (("logits_topk", "us"),), ".1f"),
        Column("one op, atomic filter: unsorted / sorted µs", (("fused_atomic", "us"),
                                                               ("fused_atomic_sorted", "us")), ".1f"),
        Column("atomic, 32-query prefill tiles µs", (("fused_atomic_s32", "us"),), ".1f"),
        Column("scan filter (default): unsorted / sorted µs", (("fused_scan", "us"), ("fused_scan_sorted", "us")),
               ".1f"),
        Column("share of rows whose set differs: atomic / scan", (("fused_atomic", "rows_differing"),
                                                                   ("fused_scan", "rows_differing")), ".4g"),
    ), commit="fae7415"),
    "logits-configs": Table("logits_launch_configs", "shape", (
        Column("bf16: rule's config / measured best µs", (("bf16_default", "us"), ("bf16_best", "us")), ".1f"),
        Column("fp8: rule's config / measured best µs", (("fp8_default", "us"), ("fp8_best", "us")), ".1f"),
    )),
    "deepgemm": Table("indexer_vs_deepgemm", "shape", (
        Column("bf16 logits / + top-k µs", (("ours_bf16_logits", "us"), ("ours_bf16_logits_topk", "us")), ".1f"),
        Column("fp8 DeepGEMM / + top-k µs", (("deepgemm_fp8_logits", "us"), ("deepgemm_fp8_logits_topk", "us")), ".1f"),
        Column("fp8 ours / + top-k µs", (("ours_fp8_logits", "us"), ("ours_fp8_logits_topk", "us")), ".1f"),
        Column("fp8 ours, paged / + top-k µs", (("ours_fp8_paged_logits", "us"), ("ours_fp8_paged_logits_topk", "us")),
               ".1f"),
        Column("one op (bf16) µs", (("ours_fused_score_topk", "us"),), ".1f"),
    ), commit="01f9cef"),
    "decode-default": Table("decode_cudagraphs_4_layers", "decode point", (
        _triple("ms: Inductor / hand-written f4 / ours f4 (default) / ours f4, S writes kept",
                ("inductor", "hand_f4", "ours_f4", "ours_f4_keep"), "ms"),
        Column("ours f4 vs hand, synced / streamed", (("ours_f4", "vs_hand"), ("ours_f4", "vs_hand_streamed"))),
    ), commit="83f884b"),
    "cross-graph": Table("cross_graph_prefill_4_layers", "pattern", (
        Column("whole graph", (("whole", "speedup_vs_inductor"),), ".2f", "×"),
        Column("whole ms", (("whole", "ms"),), ".1f"),
        Column("broken after every layer", (("broken", "speedup_vs_inductor"),), ".2f", "×"),
        Column("broken ms", (("broken", "ms"),), ".1f"),
        Column("broken / whole", (("broken", "ratio_to_whole"),)),
    )),
    "kernel-in-model-stack": Table("kernel_in_model_stack_4_layers", "queries × context", (
        Column("fuse_indexer_kernel=False ms", (("unfused", "ms"),), ".1f"),
        Column("default (fused) ms", (("fused", "ms"),), ".1f"),
        Column("speedup", (("fused", "speedup_vs_unfused"),), ".2f", "×"),
    )),
    "kernel-in-model-indexer": Table("kernel_in_model_indexer", "keys T (1024 queries)", (
        Column("Inductor ms", (("inductor", "ms"),)),
        Column("fused ms", (("fused", "ms"),)),
    )),
    "search-quality": Table("pattern_search_quality", "kept indexers", (
        Column("uniform (F every n-th layer): bits/byte", (("uniform", "bits_per_byte"),), with_pattern=True),
        Column("greedy (searched): bits/byte", (("greedy", "bits_per_byte"),), with_pattern=True),
        Column("dense attention: bits/byte", (("dense", "bits_per_byte"),)),
    )),
    "pass-cost": Table("pass_cost_cpu", "layers", (
        Column("post-grad nodes", (("pass", "nodes"),), ".0f"),
        Column("pass s (alone), code of 5ff6ec7", (("pass", "s"),)),
        Column("pass / whole compile", (("pass", "fraction_of_compile_pct"),), ".2f", " %"),
        Column("pass s (alone), code of 866e820", (("pass_866e820", "s"),)),
    )),
}


def read_results(path: Path = RESULTS) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for number, row in enumerate(rows, start=2):
        if set(row) != set(FIELDS):
            raise ValueError(f"{path}: columns {sorted(row)}; expected {FIELDS}")
        try:
            float(row["value"])
        except ValueError:
            raise ValueError(f"{path} line {number}: value {row['value']!r} is not a number") from None
    return rows


#: What makes two rows the same measurement: a newer run of it replaces the older.
ROW_KEY = ("benchmark", "shape", "variant", "pattern", "metric", "device", "commit")


def write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")  # as committed: a diff shows rows added
        writer.writeheader()
        writer.writerows(rows)


def add_rows(fragments: list[Path], results: Path = RESULTS) -> int:
    """Merge the rows of ``fragments`` (CSVs of ``FIELDS``, checked as the table is) into ``results``; returns how
    many rows were new."""
    rows = read_results(results)
    at = {tuple(row[k] for k in ROW_KEY): i for i, row in enumerate(rows)}
    added = 0
    for fragment in fragments:
        for number, row in enumerate(read_results(fragment), start=2):
            if row["commit"].endswith("-dirty"):
                raise ValueError(
                    f"{fragment} line {number}: commit {row['commit']!r}: the figures of a tree that differs from "
                    "its commit name no commit; allowed: a commit whose tree ran (run again with BENCH_COMMIT set "
                    "to it, or commit first)")
            key = tuple(row[k] for k in ROW_KEY)
            if key in at:
                rows[at[key]] = row
            else:
                at[key] = len(rows)
                rows.append(row)
                added += 1
    write_rows(results, rows)
    return added


def _cell(column: Column, values: dict[tuple[str, str, str], dict[str, str]], shape: str) -> str:
    found = [values.get((shape, variant, metric)) for variant, metric in column.cells]
    if all(row is None for row in found):
        return "—"
    text = " / ".join("—" if row is None else f"{float(row['value']):{column.fmt}}{column.suffix}" for row in found)
    if column.with_pattern and found[0] is not None and found[0]["pattern"]:
        text += f" `{found[0]['pattern']}`"
    return text


def _provenance(rows: list[dict[str, str]]) -> str:
    """Where the figures shown come from: one stamp per machine, date and source, naming every commit behind them
    (a table refreshed shape by shape over several commits lists them once, not once a commit)."""
    commits: dict[tuple[str, ...], list[str]] = {}
    for r in rows:
        of = commits.setdefault((r["device"], r["torch"], r["triton"], r["date"], r["source"]), [])
        if r["commit"] and r["commit"] not in of:
            of.append(r["commit"])
    parts = []
    for (device, torch_version, triton, date, source), of in sorted(commits.items()):
        versions = f"torch {torch_version}" + (f", Triton {triton}" if triton else "")
        where = f"`{source}`" + (f" of commit{'s' if len(of) > 1 else ''} {', '.join(of)}" if of else "")
        parts.append(f"{device}, {versions}, {date} ({where})")
    return "Measured on " + "; ".join(parts) + ". Data: `benchmarks/results/results.csv`."


def render(name: str, rows: list[dict[str, str]]) -> str:
    """The markdown of table ``name``: one line per shape, in the CSV's order, then where the figures come from."""
    table = TABLES[name]
    mine = [r for r in rows if r["benchmark"] == table.benchmark and (not table.commit or r["commit"] == table.commit)]
    if not mine:
        raise ValueError(f"table {name!r}: no rows of benchmark {table.benchmark!r} in {RESULTS.name}")
    values = {(r["shape"], r["variant"], r["metric"]): r for r in mine}
    shapes = list(dict.fromkeys(r["shape"] for r in mine))
    lines = [f"| {table.row_header} | " + " | ".join(c.header for c in table.columns) + " |",
             "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {shape} | " + " | ".join(_cell(c, values, shape) for c in table.columns) + " |" for shape in shapes]
    return "\n".join(lines) + "\n\n" + _provenance(list(values.values())) + "\n"


def refreshed(text: str, rows: list[dict[str, str]]) -> str:
    def replace(match: re.Match) -> str:
        if match.group("name") not in TABLES:
            raise ValueError(f"unknown results table {match.group('name')!r}; known: {sorted(TABLES)}")
        return match.group(1) + render(match.group("name"), rows) + match.group(4)

    return BLOCK.sub(replace, text)


def stale_docs(rows: list[dict[str, str]] | None = None) -> list[str]:
    """Docs whose generated tables differ from the data (empty when all agree)."""
    rows = read_results() if rows is None else rows
    return [str(doc.relative_to(ROOT)) for doc in DOCS if refreshed(doc.read_text(), rows) != doc.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say which docs are stale (exit 1 if any)")
    parser.add_argument("--add", type=Path, nargs="+", metavar="ROWS_CSV",
                        help="first merge these benchmark rows (a run's results_rows.csv) into the results table")
    args = parser.parse_args(argv)
    if args.add:
        added = add_rows(args.add)
        print(f"{RESULTS.relative_to(ROOT)}: {added} new row(s) from {', '.join(map(str, args.add))}")
    rows = read_results()
    stale = stale_docs(rows)
    if args.check:
        for doc in stale:
            print(f"{doc}: a results table differs from benchmarks/results/results.csv; run scripts/results_tables.py")
        return 1 if stale else 0
    for doc in DOCS:
        if str(doc.relative_to(ROOT)) in stale:
            doc.write_text(refreshed(doc.read_text(), rows))
            print(f"rewrote the results tables of {doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
