"""Check IndexCache on every sparse-attention model transformers ships and write docs/supported_models.md.

For each model in ``fx_indexcache.models.tiny_transformers`` (tiny, random, nothing downloaded) this compiles the
model once with a pattern-switching copy of the pass (``PatternSwitchBackend``, the same rewrite
``indexcache_eager_backend`` applies), runs a prefill and two decode steps with the model's own
cache, and compares every step with ``index_cache_oracle`` (indexer modules patched so S layers
return their F layer's output). It also exports the model (``torch.export``, under ``no_grad``),
rewrites the program with ``apply_index_cache_to_exported_program`` and compares its prefill.
Every cell of the table comes from these runs.

    PYTHONPATH=. python scripts/supported_models.py [--out docs/supported_models.md] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

import fx_indexcache as fic
# the IndexCache oracle lives with the tests (tests/hf_oracle.py), not in the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hf_oracle as H  # noqa: E402

YES, NO, SKIP = "✓", "✗", "–"


def _pattern(n: int) -> str:
    return ("FS" * n)[:n]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def check(name: str, spec: H.ModelSpec, dsa: bool) -> dict:
    """Run the checks for one model; returns the table row's facts."""
    started = time.perf_counter()
    tiny = H.build(spec)
    layers = tiny.num_layers
    pattern = _pattern(layers)
    prompt = 12 if spec.name != "qwen4_exp" else 6  # qwen4_exp graph-breaks once per query position
    steps = 2 if dsa else 0
    row = {"name": name, "class": spec.model_class, "layers": layers, "pattern": pattern, "prompt": prompt}
    row["indexer_modules"] = len(H.indexer_modules(tiny.model, spec))
    row["expected_routers"] = tiny.expected_router_topk

    with tiny.oracle(pattern) as sources:
        oracle = H.prefill_and_decode(tiny.model, tiny, prompt, steps)
    untouched = H.prefill_and_decode(tiny.model, tiny, prompt, steps)
    row["oracle_changes_output"] = not _same(oracle, untouched)

    torch._dynamo.reset()
    backend = H.PatternSwitchBackend({pattern: {"index_topk_pattern": pattern}})
    compiled = torch.compile(tiny.model, backend=backend)
    with H.dynamo_config(tiny), backend.use(pattern):
        got = H.prefill_and_decode(compiled, tiny, prompt, steps)
    reports = backend.reports[pattern]
    row["graphs"] = len(reports)
    row["dsa_found"] = sorted({d.layer for r in reports for d in r.decisions})
    row["sites_per_graph"] = sorted({len(r.decisions) for r in reports})
    row["routers"] = sorted({r.router_topk for r in reports}) if len(reports) <= 3 else None
    row["shared"] = sorted({d.layer for r in reports for d in r.decisions if d.action == "shared"})
    row["left"] = {}
    for report in reports:
        for decision in report.layers_left:
            row["left"].setdefault(decision.layer, []).append(decision.note)
    row["executed"] = sorted({r.pattern for r in reports if r.decisions})
    row["expected_executed"] = "".join("S" if layer in sources else "F" for layer in tiny.dsa_layers)
    row["prefill_oracle"] = torch.equal(got[0], oracle[0])
    row["prefill_untouched"] = torch.equal(got[0], untouched[0])
    row["decode_oracle"] = _same(got[1:], oracle[1:]) if steps else None
    row["decode_untouched"] = _same(got[1:], untouched[1:]) if steps else None
    row["max_diff"] = _max_diff(got, oracle)

    row["export"], row["export_untouched"], row["export_note"] = _check_export(tiny, pattern, prompt)
    row["hidden"] = tiny.config.hidden_size
    row["seconds"] = time.perf_counter() - started
    return row


def _check_export(tiny: H.TinyModel, pattern: str, prompt: int) -> tuple[bool | None, bool | None, str]:
    """(rewritten program = oracle, rewritten program = model without the pass, note)."""
    inputs = tiny.make_inputs(prompt)
    try:
        with torch.no_grad():
            program = torch.export.export(tiny.model, (), dict(inputs, use_cache=False), strict=False)
    except Exception as error:  # noqa: BLE001 - the reason goes into the table
        return None, None, f"does not export: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    config = fic.IndexCacheConfig.from_hf_config(
        tiny.config, use_index_cache=True, index_topk_pattern=pattern, indexer_types=None
    )
    report = fic.apply_index_cache_to_exported_program(program, config)
    with tiny.oracle(pattern):
        expected = H.prefill(tiny.model, tiny, prompt)
    got = H.output_of(program.module()(**inputs, use_cache=False), tiny.spec)
    untouched = H.prefill(tiny.model, tiny, prompt)
    note = f"executed pattern {report.pattern or '(no DSA layer)'}"
    return torch.equal(got, expected), torch.equal(got, untouched), note


def _mark(value: bool | None) -> str:
    return SKIP if value is None else (YES if value else NO)


def render(rows: list[dict], seconds: float) -> str:
    """docs/supported_models.md: the header, the DSA table and its notes, the other models' table."""
    dsa = [row for row in rows if row["dsa"]]
    other = [row for row in rows if not row["dsa"]]
    lines = [*_header(rows, seconds), *_dsa_table(dsa), "", *[n for row in dsa for n in _dsa_notes(row)], ""]
    lines += [*_other_table(other), "", *[n for row in other for n in _other_notes(row)], "", *_footer(rows)]
    return "\n".join(lines)


def _header(rows: list[dict], seconds: float) -> list[str]:
    return [
        "# Models checked with fx_indexcache",
        "",
        "Generated by `scripts/supported_models.py` from real runs "
        f"({datetime.date.today().isoformat()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {platform.machine()} CPU, {seconds:.0f} s). Do not edit by hand.",
        "",
        "Each model is built from its transformers config class, tiny and randomly initialised "
        f"(hidden size {'/'.join(sorted({str(r['hidden']) for r in rows}))}, "
        f"{'/'.join(sorted({str(r['layers']) for r in rows}))} decoder layers), compiled once, and run with the pattern "
        "shown: a prefill of 12 tokens and two decode steps with the model's own cache. ✓ means "
        "bitwise equal to the oracle: the eager model with each S layer's indexer module patched "
        "to return its F layer's output (`index_cache_oracle` in `tests/hf_oracle.py`). Export: "
        "`torch.export` under `no_grad`, rewritten by `apply_index_cache_to_exported_program`, "
        "prefill compared with the oracle.",
        "",
    ]


def _dsa_table(rows: list[dict]) -> list[str]:
    lines = [
        "## DeepSeek-Sparse-Attention models (one lightning-indexer top-k per DSA layer)",
        "",
        "| model | class | pattern | DSA layers found | router top-k left alone (expected) | S layers sharing "
        "| prefill | decode ×2 | export |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        found = f"{len(row['dsa_found'])} of {row['indexer_modules']} ({', '.join(map(str, row['dsa_found']))})"
        routers = f"{', '.join(map(str, row['routers']))} ({row['expected_routers']})" if row["routers"] else "–"
        shared, prefill, decode, export = _dsa_outcome(row)
        lines.append(
            f"| `{row['name']}` | `{row['class']}` | {row['pattern']} | {found} | {routers} | {shared} "
            f"| {prefill} | {decode} | {export} |"
        )
    return lines


def _dsa_outcome(row: dict) -> tuple[str, str, str, str]:
    """(S layers sharing, prefill, decode, export) cells: against the oracle, or the untouched model when left."""
    if row["left"]:
        return ("none: left as is", f"{NO} (= untouched {_mark(row['prefill_untouched'])})",
                f"{NO} (= untouched {_mark(row['decode_untouched'])})",
                f"{_mark(row['export'])} (= untouched {_mark(row['export_untouched'])})")
    shared = ", ".join(map(str, row["shared"])) or "none"
    return shared, _mark(row["prefill_oracle"]), _mark(row["decode_oracle"]), _mark(row["export"])


def _dsa_notes(row: dict) -> list[str]:
    notes = [f"- `{row['name']}` layer {layer} left as is by the pass in {len(why)} of {row['graphs']} "
             f"graphs, e.g. {why[0]}." for layer, why in row["left"].items()]
    if row["limitation"]:
        notes.append(f"- `{row['name']}`: {row['limitation']}.")
    if row["export"] is None:
        notes.append(f"- `{row['name']}` export: {row['export_note']}.")
    if not row["oracle_changes_output"]:
        notes.append(f"- `{row['name']}`: the oracle equals the model without IndexCache: the check is weak.")
    if row["dynamo_config"]:
        notes.append(f"- `{row['name']}` compiled with `torch._dynamo.config` {row['dynamo_config']}.")
    return notes


def _other_table(rows: list[dict]) -> list[str]:
    lines = [
        "## Sparse-attention models without a DSA lightning indexer (the pass must change nothing)",
        "",
        "| model | class | indexer modules | indexer top-k detected | compiled graphs "
        "| output = model without the pass | export = model without the pass | why not DSA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row['name']}` | `{row['class']}` | {row['indexer_modules']} | {len(row['dsa_found'])} "
            f"| {row['graphs']} | {_mark(row['prefill_untouched'])} | {_mark(row['export_untouched'])} "
            f"| {row['limitation']} |"
        )
    return lines


def _other_notes(row: dict) -> list[str]:
    notes = []
    if row["prompt"] != 12:
        notes.append(f"- `{row['name']}`: prefill of {row['prompt']} tokens (it graph-breaks per query).")
    if row["export"] is None:
        notes.append(f"- `{row['name']}` export: {row['export_note']}.")
    return notes


def _footer(rows: list[dict]) -> list[str]:
    return [
        "Checked and not sparse-attention models at all (no indexer module in their modeling code): "
        "`step3p7` (its config names sparse-indexer fields, but its attention has no indexer), "
        "`longcat_flash` (MoE router top-k only).",
        "",
        "Per-model run time: " + ", ".join(f"`{r['name']}` {r['seconds']:.0f} s" for r in rows) + ".",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/supported_models.md")
    parser.add_argument("--only", nargs="*", help="model names to check (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    every = [(name, spec, True) for name, spec in H.SPECS.items()]
    every += [(name, spec, False) for name, spec in H.OTHER_SPECS.items()]
    for name, spec, dsa in every:
        if args.only and name not in args.only:
            continue
        print(f"checking {name} ...", flush=True)
        row = check(name, spec, dsa)
        row.update(dsa=dsa, limitation=spec.limitation, dynamo_config=spec.dynamo_config)
        print(
            f"  {row['seconds']:.0f} s: DSA layers {row['dsa_found']}, shared {row['shared']}, "
            f"prefill={row['prefill_oracle']} decode={row['decode_oracle']} export={row['export']} "
            f"max diff {row['max_diff']:.3g}",
            flush=True,
        )
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, time.perf_counter() - started))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
