"""``fx-indexcache overlap``: how much adjacent DSA layers' top-k selections agree, measured on the graph.

The model is traced once with ``probe.IndexProbe`` (every layer's indices recorded, nothing in
the model edited) and run on the calibration batches with every layer F; the overlap of each pair
of layers is averaged over the queries of every batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

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
    match = (a[:, :, None] == b[:, None, :]) & va[:, :, None] & vb[:, None, :]
    common = match.any(-1).sum(-1).float()
    count = torch.maximum(va.sum(-1), vb.sum(-1))
    denominator = count.float()
    keep = count > 0
    if skip_short and bool((count == k).any()):
        keep = count == k  # fewer real keys than k: every visible key is selected, overlap 1 by force
    if not bool(keep.any()):
        return float("nan")
    return (common[keep] / denominator[keep]).mean().item()


@dataclasses.dataclass
class OverlapResult:
    layers: list[int]
    matrix: torch.Tensor  # [L, L] float64, mean over calibration batches
    k: int

    @property
    def adjacent(self) -> list[tuple[int, int, float]]:
        return [(self.layers[i], self.layers[i + 1], self.matrix[i, i + 1].item()) for i in range(len(self.layers) - 1)]


def overlap_from_records(batches: list[dict[int, LayerRecord]]) -> OverlapResult:
    """Layer × layer overlap averaged over calibration batches (each a probe's records of one call)."""
    layers = sorted(batches[0])
    n = len(layers)
    matrix = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            values = []
            for records in batches:
                a, b = records[layers[i]], records[layers[j]]
                same = a.indices.shape == b.indices.shape
                values.append(overlap_fraction(a.indices, b.indices, a.valid, b.valid) if same else float("nan"))
            matrix[i, j] = matrix[j, i] = sum(values) / len(values)
    return OverlapResult(layers, matrix, batches[0][layers[0]].indices.shape[-1])


def measure_overlap(target: ProbeTarget) -> OverlapResult:
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
    add_plot_argument(parser, "the layer x layer overlap heatmap")


def main(args: argparse.Namespace) -> int:
    if args.plot and (missing := missing_plot_support()):
        print(f"fx-indexcache overlap: {missing}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    target = build_target(args)
    start = time.perf_counter()
    result = measure_overlap(target)
    elapsed = time.perf_counter() - start
    print(f"{target.name}: {len(result.layers)} DSA layers, {len(target.batches)} calibration batches "
          f"({elapsed:.1f} s incl. compile)\n")
    print(format_overlap(result))
    if args.plot:
        save_heatmap(result, args.plot, f"{target.name}: top-{result.k} overlap")
        print(f"\nheatmap saved to {args.plot}")
    sys.stdout.flush()
    return 0
