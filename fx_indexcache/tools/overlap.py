"""``fx-indexcache overlap``: how much adjacent DSA layers' top-k selections agree, measured on the graph.

The model is traced once with ``probe.IndexProbe`` (every layer's indices recorded, nothing in
the model edited) and run on the calibration batches with every layer F; the overlap of each pair
of layers is averaged over the queries of every batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from .calibration import ProbeTarget, add_model_arguments, build_target, compile_probe, record_batches
from .plotting import add_plot_argument, missing_plot_support, pyplot
from .probe import LayerRecord

# ----------------------------------------------------------------------------------- overlap


def overlap_fraction(a: torch.Tensor, b: torch.Tensor, valid_a=None, valid_b=None, skip_short: bool = True) -> float:
    """Mean over queries of |A ∩ B| / (number of real keys selected), padding slots ignored.

    ``a``/``b``: indices ``[..., k]`` of two layers for the same queries; ``valid_*`` mark the slots
    holding a real (unmasked) key. Queries that see fewer than k keys select all of them in every
    layer; with ``skip_short`` they are left out whenever some query sees k keys or more. Queries
    where no slot is valid are skipped; NaN when none is left.
    """
    if a.shape != b.shape:
        raise ValueError(f"indices shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    k = a.shape[-1]
    a, b = a.reshape(-1, k), b.reshape(-1, k)
    va = torch.ones_like(a, dtype=torch.bool) if valid_a is None else valid_a.reshape(-1, k)
    vb = torch.ones_like(b, dtype=torch.bool) if valid_b is None else valid_b.reshape(-1, k)
    common = _common_keys(a, b, va, vb).float()
    count = torch.maximum(va.sum(-1), vb.sum(-1))
    denominator = count.float()
    keep = count > 0
    if skip_short and bool((count == k).any()):
        keep = count == k  # fewer real keys than k: every visible key is selected, overlap 1 by force
    if not bool(keep.any()):
        return float("nan")
    return (common[keep] / denominator[keep]).mean().item()


def _common_keys(a: torch.Tensor, b: torch.Tensor, va: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
    """Per row, how many valid slots of ``a`` hold a key some valid slot of ``b`` holds.

    Sorting ``b`` and searching it keeps memory at the size of the indices (``[N, k]``); comparing every pair of
    slots would take ``[N, k, k]``, 34 GB for one 8K-token batch at DeepSeek-V3.2's k = 2048.
    """
    b = b.masked_fill(~vb, torch.iinfo(b.dtype).min)  # a padding slot of b matches nothing
    b_sorted = b.sort(dim=-1).values
    position = torch.searchsorted(b_sorted, a.contiguous()).clamp_(max=b.shape[-1] - 1)
    found = (b_sorted.gather(-1, position) == a) & va
    return found.sum(-1)


@dataclasses.dataclass
class OverlapResult:
    """Layer × layer top-k overlap: ``matrix[i, j]`` for ``layers[i]``, ``layers[j]``, mean over calibration batches."""

    layers: list[int]
    matrix: torch.Tensor  # [L, L] float64, mean over calibration batches
    k: int
    batches: int = 0  # calibration batches averaged

    @property
    def adjacent(self) -> list[tuple[int, int, float]]:
        return [(self.layers[i], self.layers[i + 1], self.matrix[i, i + 1].item()) for i in range(len(self.layers) - 1)]

    def to_dict(self) -> dict:
        """A JSON-ready record (NaN, where no query saw k keys, becomes null)."""
        def number(value: float) -> float | None:
            return None if value != value else round(value, 6)

        return {
            "layers": list(self.layers),
            "k": self.k,
            "batches": self.batches,
            "adjacent": [{"from": a, "to": b, "overlap": number(v)} for a, b, v in self.adjacent],
            "matrix": [[number(v) for v in row] for row in self.matrix.tolist()],
        }


class OverlapAccumulator:
    """Adds up the pairwise overlap one batch at a time, so only one batch's indices are ever held."""

    def __init__(self) -> None:
        self.layers: list[int] | None = None
        self.k = 0
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.batches = 0

    def add(self, records: dict[int, LayerRecord]) -> None:
        layers = sorted(records)
        if self.layers is None:
            self.layers, self.k = layers, records[layers[0]].indices.shape[-1]
            self.sums = torch.zeros(len(layers), len(layers), dtype=torch.float64)
            self.counts = torch.zeros_like(self.sums)
        elif layers != self.layers:
            raise ValueError(f"a calibration batch recorded DSA layers {layers}, an earlier one {self.layers}")
        for i in range(len(layers)):
            for j in range(i + 1, len(layers)):
                a, b = records[layers[i]], records[layers[j]]
                if a.indices.shape != b.indices.shape:
                    continue  # another top-k width: no overlap defined (NaN unless some batch has one)
                value = overlap_fraction(a.indices, b.indices, a.valid, b.valid)
                if value == value:
                    self.sums[i, j] += value
                    self.counts[i, j] += 1
        self.batches += 1

    def result(self) -> OverlapResult:
        if self.layers is None:
            raise ValueError("no calibration batch was recorded")
        mean = self.sums / self.counts  # 0/0 -> NaN where no batch had a defined overlap
        matrix = torch.eye(len(self.layers), dtype=torch.float64)
        upper = torch.triu_indices(len(self.layers), len(self.layers), 1)
        matrix[upper[0], upper[1]] = mean[upper[0], upper[1]]
        matrix[upper[1], upper[0]] = mean[upper[0], upper[1]]
        return OverlapResult(list(self.layers), matrix, self.k, self.batches)


def overlap_from_records(batches: list[dict[int, LayerRecord]]) -> OverlapResult:
    """Layer × layer overlap averaged over calibration batches (each a probe's records of one call)."""
    accumulator = OverlapAccumulator()
    for records in batches:
        accumulator.add(records)
    return accumulator.result()


def overlap_of_target(target: ProbeTarget) -> OverlapResult:
    probe, compiled = compile_probe(target, switchable=False)
    return overlap_from_records(record_batches(target, probe, compiled))


# ----------------------------------------------------------------------------------- output


def format_overlap(result: OverlapResult) -> str:
    lines = [f"adjacent-layer top-{result.k} overlap (|A∩B| / k, mean over the queries that see at least "
             f"{result.k} keys; padding slots ignored):"]
    for a, b, value in result.adjacent:
        bar = "#" * round(value * 40) if value == value else ""
        lines.append(f"  layer {a:>2} -> {b:>2}: {value:6.3f}  {bar}")
    lines.append("")
    lines.append("layer x layer overlap:")
    width = 6
    lines.append("      " + "".join(f"{layer:>{width}}" for layer in result.layers))
    for i, layer in enumerate(result.layers):
        row = "".join(f"{result.matrix[i, j].item():>{width}.2f}" for j in range(len(result.layers)))
        lines.append(f"  {layer:>3} " + row)
    return "\n".join(lines)


def save_heatmap(result: OverlapResult, path: str, title: str) -> None:
    plt = pyplot()
    n = len(result.layers)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.6 + 0.5 * n))
    image = ax.imshow(result.matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), [str(layer) for layer in result.layers])
    ax.set_yticks(range(n), [str(layer) for layer in result.layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    if n <= 16:
        for i in range(n):
            for j in range(n):
                value = result.matrix[i, j].item()
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=ax, label=f"top-{result.k} overlap")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--save", default=None, metavar="OVERLAP.json", help="write the overlap record as JSON")
    add_plot_argument(parser, "the layer x layer overlap heatmap")


def main(args: argparse.Namespace) -> int:
    from .pattern_choice import overlap_of

    if args.plot and (missing := missing_plot_support()):
        print(f"fx-indexcache overlap: {missing}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    target = build_target(args)
    start = time.perf_counter()
    try:
        result = overlap_of(target, progress=True)
    except ValueError as error:  # no DSA indexer in the graph, named with what was looked for
        raise SystemExit(f"error: {error}") from None
    elapsed = time.perf_counter() - start
    print(f"{target.name}: {len(result.layers)} DSA layers, {len(target.batches)} calibration batches "
          f"({elapsed:.1f} s incl. compile)\n")
    print(format_overlap(result))
    if args.save:
        Path(args.save).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"\noverlap record saved to {args.save}")
    if args.plot:
        save_heatmap(result, args.plot, f"{target.name}: top-{result.k} overlap")
        print(f"\nheatmap saved to {args.plot}")
    sys.stdout.flush()
    return 0
