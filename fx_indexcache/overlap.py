"""``fx-indexcache overlap``: how much adjacent DSA layers' top-k selections agree, measured on the graph.

Nothing in the model is edited. ``IndexProbe`` is a ``torch.compile`` backend: on the ATen graph that
AOTAutograd hands over it runs ``detect`` and then

* adds every site's indices (and a flag per selected slot: is its score finite, i.e. a real key and
  not padding chosen because k exceeds the visible keys) to the graph's outputs; the compiled
  function strips those extra outputs again and keeps them in ``probe.records``;
* puts a selector between each site's indices and their consumers that, at run time, hands the
  consumers either the layer's own indices or those of another earlier layer, following
  ``probe.pattern`` (an F/S string read on every call). All indexers stay in the graph, so one
  trace serves every pattern: ``pattern_search`` uses this to score candidates without recompiling.

The graph runs eagerly (no Inductor), like ``indexcache_eager_backend``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import operator
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx

from .detection import detect
from .graph_utils import node_order

# ----------------------------------------------------------------------------------- the probe


@dataclasses.dataclass
class ProbedGraph:
    """What the probe found in one compiled graph."""

    layers: list[int]  # DSA layers whose indices this graph records
    switchable: dict[int, list[int]]  # layer -> earlier layers whose indices it may take at run time
    fixed: dict[int, str]  # layer -> why it cannot take another layer's indices (stays F)


@dataclasses.dataclass
class LayerRecord:
    """One layer's selection in one call: indices ``[..., k]`` and which slots hold a real key."""

    indices: torch.Tensor
    valid: torch.Tensor | None  # bool, same shape; None where the top-k values were not reachable


def source_layers(pattern: str | None, layers: list[int]) -> dict[int, int]:
    """``{S layer: nearest preceding F layer}`` among ``layers``; an S with no F before it stays own."""
    sources: dict[int, int] = {}
    if pattern is None:
        return sources
    last_full = None
    for layer in sorted(layers):
        kind = pattern[layer] if layer < len(pattern) else "F"
        if kind == "S" and last_full is not None:
            sources[layer] = last_full
        else:
            last_full = layer
    return sources


def _finite_mask(values: torch.Tensor) -> torch.Tensor:
    """Slots whose top-k score is a real score (masked keys score -inf or the dtype's lowest value)."""
    if not values.is_floating_point():
        return torch.ones_like(values, dtype=torch.bool)
    return torch.isfinite(values) & (values > torch.finfo(values.dtype).min / 2)


class IndexProbe:
    """``torch.compile`` backend that records every DSA layer's top-k and can swap them by pattern.

    ``probe.pattern`` (None: every layer uses its own indices) is read on every call; set it with
    ``with probe.use(pattern):``. ``probe.records`` maps layer -> ``LayerRecord`` of the last call
    (cleared by ``probe.clear()``; a model split over several graphs fills it from each).
    """

    def __init__(self, switchable: bool = True) -> None:
        self.switchable = switchable
        self.graphs: list[ProbedGraph] = []
        self.records: dict[int, LayerRecord] = {}
        self._pattern: str | None = None
        self.sources: dict[int, int] = {}

    # ---- pattern ----------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted({layer for graph in self.graphs for layer in graph.layers})

    @property
    def fixed(self) -> dict[int, str]:
        """Layers that cannot be made S (in some graph), with the reason."""
        out: dict[int, str] = {}
        for graph in self.graphs:
            out.update(graph.fixed)
        return out

    @property
    def pattern(self) -> str | None:
        return self._pattern

    @pattern.setter
    def pattern(self, pattern: str | None) -> None:
        if pattern is not None and (not pattern or set(pattern) - {"F", "S"}):
            raise ValueError(f"pattern {pattern!r} must be a non-empty F/S string")
        self._pattern = pattern
        self.sources = source_layers(pattern, self.layers)

    @contextlib.contextmanager
    def use(self, pattern: str | None) -> Iterator[None]:
        previous = self._pattern
        self.pattern = pattern
        try:
            yield
        finally:
            self.pattern = previous

    def clear(self) -> None:
        self.records = {}

    def select(self, layer: int, choices: tuple[int, ...], *indices: torch.Tensor) -> torch.Tensor:
        """Run-time selector (a graph node): the indices ``layer`` attends with under ``self.pattern``.

        ``choices`` names the layer of each tensor in ``indices``; the last one is the layer's own.
        """
        source = self.sources.get(layer)
        if source is not None and source in choices:
            return indices[choices.index(source)]
        return indices[-1]

    # ---- compile ----------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=self._instrument)(gm, example_inputs)

    def _instrument(self, module: fx.GraphModule, inputs) -> Callable:
        from functorch.compile import make_boxed_func

        graph = module.graph
        detection = detect(graph)
        sites = detection.sites
        order = node_order(graph)
        info = ProbedGraph([site.layer for site in sites], {}, {})

        # Decide eligibility before adding anything (our own value reads would look like a use).
        for site in sites:
            reason = site.refusal()
            if site.kind != "aten.topk":  # e.g. vLLM's opaque op writes a buffer: no plain edge to switch
                reason = f"{site.kind} indexer sites are recorded, not switched"
            if reason is not None:
                info.fixed[site.layer] = reason
                continue
            choices, why_not = [], ""
            for source in sites:
                if source.layer >= site.layer:
                    continue
                if order[source.indices] > order[site.indices]:
                    why_not = f"layer {source.layer}'s indices are computed after this layer's"
                    continue
                reason = site.incompatibility(source)
                if reason is None:
                    choices.append(source.layer)
                else:
                    why_not = reason
            info.switchable[site.layer] = choices
            if not choices and why_not:
                info.fixed[site.layer] = f"no earlier layer's indices can replace its own ({why_not})"

        # Selectors: each consumer of layer i's indices reads select(i, earlier layers' indices..., own).
        if self.switchable:
            by_layer = {site.layer: site for site in sites}
            for site in sites:
                choices = info.switchable.get(site.layer)
                if not choices:
                    continue
                own = site.indices
                with graph.inserting_after(own):
                    args = (site.layer, (*choices, site.layer), *[by_layer[c].indices for c in choices], own)
                    chosen = graph.call_function(self.select, args)
                chosen.meta.update(own.meta)
                own.replace_all_uses_with(chosen, delete_user_cb=lambda user, chosen=chosen: user is not chosen)

        # Extra outputs: each layer's own indices and whether each selected slot is a real key.
        output = next(node for node in graph.nodes if node.op == "output")
        original = output.args[0]
        extras, keys = [], []
        with graph.inserting_before(output):
            for site in sites:
                extras.append(site.indices)
                anchor = site.anchor
                if anchor.target is torch.ops.aten.topk.default:  # other site kinds: no values to read
                    values = graph.call_function(operator.getitem, (anchor, 0))
                    extras.append(graph.call_function(_finite_mask, (values,)))
                else:
                    extras.append(None)
                keys.append(site.layer)
        n_out = len(original)
        output.args = ((*original, *extras),)
        graph.lint()
        module.recompile()
        self.graphs.append(info)

        def run(*args):
            results = module(*args)
            for i, layer in enumerate(keys):
                indices, valid = results[n_out + 2 * i], results[n_out + 2 * i + 1]
                self.records[layer] = LayerRecord(indices, valid)
            return list(results[:n_out])

        return make_boxed_func(run)


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


# ----------------------------------------------------------------------------------- models


@dataclasses.dataclass
class ProbeTarget:
    """A model to probe: how to call it on a batch and read the next-token logits."""

    name: str
    model: torch.nn.Module
    num_layers: int  # decoder layers (the pattern string's length)
    batches: list[Any]  # calibration inputs, one per call
    call: Callable[[Callable, Any], torch.Tensor]  # (model or compiled, batch) -> logits [B, S, V]
    is_logits: bool = True  # False: the output is hidden states (score with MSE instead of KL)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=8, help="reference model: DSA layers (default 8)")
    parser.add_argument("--hf-model", default=None, help="a tiny transformers DSA model from hf_models.TINY_DSA_MODELS")
    parser.add_argument("--batches", type=int, default=2, help="calibration batches (default 2)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=48, help="tokens per sequence (default 48, top-k is 16)")
    parser.add_argument("--seed", type=int, default=0, help="weights and calibration tokens (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: fastest for tiny models on a shared CPU; 0 keeps torch's)")


def build_target(args: argparse.Namespace) -> ProbeTarget:
    """The reference model (default) or ``--hf-model NAME``, with random calibration tokens."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.hf_model:
        try:
            from . import hf_models
        except ImportError as error:  # transformers missing
            raise SystemExit(f"--hf-model needs transformers and fx_indexcache.hf_models: {error}") from error
        if args.hf_model not in hf_models.TINY_DSA_MODELS:
            raise SystemExit(f"--hf-model {args.hf_model!r}: choose from {sorted(hf_models.TINY_DSA_MODELS)}")
        tiny = hf_models.TINY_DSA_MODELS[args.hf_model](seed=args.seed)
        batches = [tiny.make_inputs(args.seq_len, seed=args.seed + i, batch=args.batch_size) for i in range(args.batches)]

        def call_hf(fn, batch):
            return hf_models.output_of(fn(**batch, use_cache=False), tiny.spec)

        return ProbeTarget(
            args.hf_model, tiny.model, tiny.num_layers, batches, call_hf,
            is_logits=tiny.spec.output == "logits", context=lambda: hf_models.dynamo_config(tiny),
        )
    from .reference import DSAModelConfig, ReferenceDSAModel

    config = DSAModelConfig.tiny(num_layers=args.layers)
    model = ReferenceDSAModel(config, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        for _ in range(args.batches)
    ]
    return ProbeTarget(f"reference ({args.layers} layers)", model, config.num_layers, batches, lambda fn, ids: fn(ids))


def compile_probe(target: ProbeTarget, switchable: bool = True) -> tuple[IndexProbe, Callable]:
    """The probe backend and the model compiled with it (traced on the first call)."""
    probe = IndexProbe(switchable=switchable)
    compiled = torch.compile(target.model, backend=probe, dynamic=False)
    return probe, compiled


@torch.no_grad()
def record_batches(target: ProbeTarget, probe: IndexProbe, compiled: Callable) -> list[dict[int, LayerRecord]]:
    """Run every calibration batch with all layers F; each batch's per-layer records."""
    out = []
    with target.context(), probe.use(None):
        for batch in target.batches:
            probe.clear()
            target.call(compiled, batch)
            if not probe.records:
                raise RuntimeError(f"{target.name}: no DSA indexer top-k found in the compiled graph(s)")
            out.append(dict(probe.records))
    return out


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    parser.add_argument("--out", default="indexcache_overlap.png", help="heatmap PNG (default indexcache_overlap.png)")


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    target = build_target(args)
    start = time.perf_counter()
    result = measure_overlap(target)
    elapsed = time.perf_counter() - start
    print(f"{target.name}: {len(result.layers)} DSA layers, {len(target.batches)} calibration batches "
          f"({elapsed:.1f} s incl. compile)\n")
    print(format_overlap(result))
    save_heatmap(result, args.out, f"{target.name}: top-{result.k} overlap")
    print(f"\nheatmap saved to {args.out}")
    sys.stdout.flush()
    return 0
