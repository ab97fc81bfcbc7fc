"""Check IndexCache on every sparse-attention model transformers ships and write docs/supported_models.md.

One row per architecture and layer layout (``LAYOUTS``): each model of ``fx_indexcache.models.tiny_transformers``
(tiny, random, nothing downloaded) with every layer indexed, and the hybrid layouts the real checkpoints
use (DeepSeek-V4's heavily-compressed layers between compressed-sparse ones, GLM-5.3-Flash's linear-attention
layers between indexed ones, GLM-5.2's natively shared indexers). For each row this compiles the
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
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Layout:
    """One table row: a model, the config overrides that give its layer layout, and the pattern requested."""

    row: str  # the row's name in the table
    model: str  # SPECS / OTHER_SPECS key
    layout: str  # the layer types, in words
    overrides: dict = dataclasses.field(default_factory=dict)
    pattern: str | None = None  # None: F and S alternating over the decoder layers
    model_keys: bool = False  # True: the IndexCache config comes from the model's own config keys


def _types(kinds: dict[str, str], types: list[str]) -> str:
    """``['hca', 'hca', 'csa']`` → ``HCA×2, CSA``: a layer layout in words."""
    runs: list[list] = []
    for kind in types:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return ", ".join(f"{kinds.get(k, k)}×{n}" if n > 1 else kinds.get(k, k) for k, n in runs)


_V4 = {"compressed_sparse_attention": "CSA", "heavily_compressed_attention": "HCA", "sliding_attention": "SWA"}
_GLM5 = {"indexed_attention": "indexed", "linear_attention": "KDA linear"}
#: GLM-5.3-Flash's own rule (configuration_glm5_next.py): every fourth layer indexed, the rest linear attention.
_GLM5_LAYERS = 8
_GLM5_TYPES = ["indexed_attention" if i % 4 == 3 else "linear_attention" for i in range(_GLM5_LAYERS)]
#: DeepSeek-V4's default (configuration_deepseek_v4.py, the V4-Pro schedule): two HCA, then HCA/CSA interleaved.
_V4_LAYERS = 6
_V4_TYPES = ["heavily_compressed_attention"] * 2 + [
    "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(_V4_LAYERS - 2)
]

LAYOUTS: list[Layout] = [
    *(Layout(name, name, "every layer indexed") for name in H.SPECS if name not in ("deepseek_v4", "glm5_next")),
    Layout("deepseek_v4", "deepseek_v4", "CSA×3 (every layer indexed)"),
    Layout(
        "deepseek_v4 (default layout)", "deepseek_v4", _types(_V4, _V4_TYPES),
        dict(num_hidden_layers=_V4_LAYERS, layer_types=_V4_TYPES, mlp_layer_types=["moe"] * _V4_LAYERS),
        pattern="F" * (_V4_LAYERS - 1) + "S",
    ),
    Layout("glm5_next", "glm5_next", "indexed×3"),
    Layout(
        "glm5_next (default layout)", "glm5_next", _types(_GLM5, _GLM5_TYPES),
        dict(num_hidden_layers=_GLM5_LAYERS, layer_types=_GLM5_TYPES, indexer_types=["full"] * _GLM5_LAYERS,
             mlp_layer_types=["dense"] * 3 + ["sparse"] * (_GLM5_LAYERS - 3)),
        pattern="F" * (_GLM5_LAYERS - 1) + "S",
    ),
    Layout(
        "glm_moe_dsa (native sharing)", "glm_moe_dsa", "indexer_types full, shared, full (GLM-5.2's keys)",
        dict(indexer_types=["full", "shared", "full"]), model_keys=True,
    ),
    *(Layout(name, name, "every layer indexed") for name in H.OTHER_SPECS),
]


def _config(tiny: H.TinyModel, layout: Layout, pattern: str) -> fic.IndexCacheConfig:
    if layout.model_keys:  # the model's own keys (indexer_types) are the pattern
        return fic.IndexCacheConfig.from_hf_config(tiny.config, use_index_cache=True)
    return fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern)


def check(layout: Layout, spec: H.ModelSpec, dsa: bool) -> dict:
    """Run the checks for one row; returns the row's facts."""
    started = time.perf_counter()
    tiny = H.build(spec, **layout.overrides)
    layers = tiny.num_layers
    pattern = layout.pattern or _pattern(layers)
    config = _config(tiny, layout, pattern)
    pattern = "".join(config.layer_kind(i) for i in range(layers))
    prompt = 12 if spec.name != "qwen4_exp" else 6  # qwen4_exp graph-breaks once per query position
    steps = 2 if dsa else 0
    row = {"name": layout.row, "model": spec.name, "class": spec.model_class, "layout": layout.layout,
           "layers": layers, "pattern": pattern, "prompt": prompt, "model_keys": layout.model_keys}
    row["indexer_modules"] = len(H.indexer_modules(tiny.model, spec))
    row["expected_routers"] = tiny.expected_router_topk

    with tiny.oracle(pattern) as sources:
        oracle = H.prefill_and_decode(tiny.model, tiny, prompt, steps)
    untouched = H.prefill_and_decode(tiny.model, tiny, prompt, steps)
    row["oracle_sources"] = sources
    row["oracle_changes_output"] = not _same(oracle, untouched)

    torch._dynamo.reset()
    backend = H.PatternSwitchBackend({pattern: config})
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
    # one graph per step when the model traces whole (prefill, then each decode step)
    per_step = [sorted(d.layer for d in r.layers_left) for r in reports] if len(reports) == steps + 1 else None
    row["left_per_step"] = per_step
    row["executed"] = sorted({r.pattern for r in reports if r.decisions})
    row["expected_executed"] = "".join("S" if layer in sources else "F" for layer in tiny.dsa_layers)
    row["steps_oracle"] = [torch.equal(a, b) for a, b in zip(got, oracle)]
    row["steps_untouched"] = [torch.equal(a, b) for a, b in zip(got, untouched)]
    row["prefill_oracle"], row["prefill_untouched"] = row["steps_oracle"][0], row["steps_untouched"][0]
    row["max_diff"] = _max_diff(got, oracle)

    row["export"], row["export_untouched"], row["export_note"] = _check_export(tiny, config, pattern, prompt)
    row["hidden"] = tiny.config.hidden_size
    row["seconds"] = time.perf_counter() - started
    return row


def _check_export(
    tiny: H.TinyModel, config: fic.IndexCacheConfig, pattern: str, prompt: int
) -> tuple[bool | None, bool | None, str]:
    """(rewritten program = oracle, rewritten program = model without the pass, note)."""
    inputs = tiny.make_inputs(prompt)
    try:
        with torch.no_grad():
            program = torch.export.export(tiny.model, (), dict(inputs, use_cache=False), strict=False)
    except Exception as error:  # noqa: BLE001 - the reason goes into the table
        return None, None, f"does not export: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
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
    """docs/supported_models.md: the header, the indexed-models table and its notes, the other models' table."""
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
        "One row per architecture and layer layout. Each model is built from its transformers config class, tiny "
        f"and randomly initialised (hidden size {'/'.join(sorted({str(r['hidden']) for r in rows}))}, "
        f"{'/'.join(sorted({str(r['layers']) for r in rows}, key=int))} decoder layers), compiled once "
        "(`torch.compile`, dynamic shapes as dynamo chooses them), and run with the pattern shown: a prefill of "
        "12 tokens and two decode steps with the model's own cache. ✓ means bitwise equal to the oracle: the "
        "eager model with each S layer's indexer module patched to return the output of the nearest preceding "
        "indexed layer that computes, the engines' one-buffer rule (`index_cache_oracle` in `tests/hf_oracle.py`). Export: `torch.export` under "
        "`no_grad`, rewritten by `apply_index_cache_to_exported_program`, prefill compared with the oracle. "
        "A ✗ says which layers the pass left as is in that step; the notes say why sharing there is not proven "
        "right.",
        "",
    ]


def _dsa_table(rows: list[dict]) -> list[str]:
    lines = [
        "## Models with an indexer the pass shares (DSA lightning indexers, block indexers)",
        "",
        "| model | layout | pattern | indexed layers found | router top-k left alone (expected) "
        "| S layers sharing | prefill | decode 1 | decode 2 | export |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        found = f"{len(row['dsa_found'])} of {row['indexer_modules']} ({', '.join(map(str, row['dsa_found']))})"
        routers = f"{', '.join(map(str, row['routers']))} ({row['expected_routers']})" if row["routers"] else "–"
        shared = ", ".join(map(str, row["shared"])) or "none"
        steps = [_step_cell(row, step) for step in range(len(row["steps_oracle"]))]
        export = _mark(row["export"]) if row["export"] or not row["left"] else (
            f"{NO} (= untouched {_mark(row['export_untouched'])})")
        lines.append(
            f"| `{row['name']}` | {row['layout']} | {row['pattern']} | {found} | {routers} | {shared} "
            f"| {' | '.join(steps)} | {export} |"
        )
    return lines


def _step_cell(row: dict, step: int) -> str:
    """✓ when the step equals the oracle; else ✗ with the layers the pass left as is there."""
    if row["steps_oracle"][step]:
        return YES
    left = row["left_per_step"][step] if row["left_per_step"] else sorted(row["left"])
    untouched = f", = untouched {YES}" if row["steps_untouched"][step] else ""
    return f"{NO} (left as is: {', '.join(map(str, left)) or 'none'}{untouched})"


def _dsa_notes(row: dict) -> list[str]:
    notes = []
    for layer, why in row["left"].items():
        reasons = list(dict.fromkeys(why))
        notes.append(f"- `{row['name']}` layer {layer} left as is by the pass in {len(why)} of {row['graphs']} "
                     f"graphs: {'; '.join(reasons)}.")
    if row["model_keys"]:
        notes.append(f"- `{row['name']}`: the pattern is the model's own `indexer_types` "
                     "(`IndexCacheConfig.from_hf_config`): the model already shares, and the pass adds nothing.")
    for key in ("limitation", "decode_limitation"):
        if row[key]:
            notes.append(f"- `{row['name']}`: {row[key]}.")
    if row["export"] is None:
        notes.append(f"- `{row['name']}` export: {row['export_note']}.")
    if not row["oracle_changes_output"]:
        notes.append(f"- `{row['name']}`: the oracle equals the model without IndexCache (no indexed layer "
                     "takes another's indices): the check is that the pass changes nothing.")
    if row["dynamo_config"]:
        notes.append(f"- `{row['name']}` compiled with `torch._dynamo.config` {row['dynamo_config']}.")
    return notes


def _other_table(rows: list[dict]) -> list[str]:
    lines = [
        "## Sparse-attention models whose indexer no graph holds as one top-k per layer (the pass changes nothing)",
        "",
        "| model | class | indexer modules | indexer top-k detected | compiled graphs "
        "| output = model without the pass | export = model without the pass | why the pass cannot share |",
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
    parser.add_argument("--only", nargs="*", help="row or model names to check (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    for layout in LAYOUTS:
        if args.only and layout.row not in args.only and layout.model not in args.only:
            continue
        dsa = layout.model in H.SPECS
        spec = H.SPECS[layout.model] if dsa else H.OTHER_SPECS[layout.model]
        print(f"checking {layout.row} ...", flush=True)
        row = check(layout, spec, dsa)
        row.update(dsa=dsa, limitation=spec.limitation, decode_limitation=spec.decode_limitation,
                   dynamo_config=spec.dynamo_config)
        print(
            f"  {row['seconds']:.0f} s: indexed layers {row['dsa_found']}, shared {row['shared']}, "
            f"steps = oracle {row['steps_oracle']}, export={row['export']}, max diff {row['max_diff']:.3g}",
            flush=True,
        )
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, time.perf_counter() - started))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
