"""``fx-indexcache search``: greedy, training-free search for an IndexCache F/S pattern.

Start with every DSA layer F; at each step try turning each remaining F layer (never the first
DSA layer) into S, keep the change that moves the model's output least, and stop at the target
number of F layers. The score of a pattern is the KL divergence of the next-token distribution
from the all-F model's (default), or the LM loss on the calibration tokens (``--score loss``),
averaged over every position of every calibration batch.

How a candidate is evaluated without recompiling: the model is traced once with
``probe.IndexProbe``, which leaves every indexer in the graph and routes each layer's indices
through a run-time selector that follows ``probe.pattern``. Setting the pattern and calling the
compiled model runs exactly the IndexCache semantics (an S layer attends with its nearest F
layer's indices, F layers recompute theirs on the hidden states this pattern produces), so one
trace serves all O(L²) candidates. Replaying indices recorded from the all-F run would be cheaper
still but wrong: once an earlier layer is S the later F layers see other hidden states and pick
other keys. The price is that S layers' indexers still run during the search (their result is
discarded), which only costs calibration time.
"""

from __future__ import annotations

import argparse
import sys
import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import IndexCacheConfig
from .calibration import ProbeTarget, add_model_arguments, build_target, compile_probe
from .plotting import add_plot_argument, missing_plot_support, pyplot

# ----------------------------------------------------------------------------------- scoring


def kl_next_token(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """KL(P_reference ‖ P_candidate) of the next-token distributions, summed over positions."""
    ref = F.log_softmax(reference.float().reshape(-1, reference.shape[-1]), dim=-1)
    cand = F.log_softmax(candidate.float().reshape(-1, candidate.shape[-1]), dim=-1)
    return (ref.exp() * (ref - cand)).sum()


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t, summed over positions."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="sum"
    )


class PatternScorer:
    """Scores F/S patterns on the calibration batches with one traced graph (see the module doc)."""

    def __init__(self, target: ProbeTarget, score: str = "kl") -> None:
        if score not in ("kl", "loss"):
            raise ValueError(f"score must be 'kl' or 'loss', not {score!r}")
        if score == "loss" and not target.is_logits:
            raise ValueError(f"{target.name} returns hidden states, not logits: use score='kl' (MSE then)")
        self.target, self.score = target, score
        self.probe, self.compiled = compile_probe(target, switchable=True)
        self.evaluations = 0
        self.reference = [self._outputs(None, batch) for batch in target.batches]  # traces here
        self.layers = self.probe.layers
        if not self.layers:
            raise RuntimeError(f"{target.name}: no DSA indexer top-k found in the compiled graph(s)")

    @property
    def metric(self) -> str:
        if self.score == "loss":
            return "LM loss"
        return "KL(all-F ‖ pattern)" if self.target.is_logits else "MSE vs all-F"

    @property
    def fixed(self) -> dict[int, str]:
        """Layers that cannot become S in the traced graph, with why."""
        fixed = dict(self.probe.fixed)
        for graph in self.probe.graphs:
            for layer, choices in graph.switchable.items():
                if not choices and layer != self.layers[0]:
                    fixed.setdefault(layer, "no earlier DSA layer in the same graph (graph break?)")
        return fixed

    @torch.no_grad()
    def _outputs(self, pattern: str | None, batch) -> torch.Tensor:
        with self.target.context(), self.probe.use(pattern):
            self.probe.clear()
            return self.target.call(self.compiled, batch)

    @torch.no_grad()
    def __call__(self, pattern: str) -> float:
        """Mean per-position score of ``pattern`` over all calibration batches."""
        self.evaluations += 1
        total, count = 0.0, 0
        for batch, reference in zip(self.target.batches, self.reference):
            out = self._outputs(pattern, batch)
            positions = out.numel() // out.shape[-1]
            if self.score == "loss":
                total += lm_loss(out, _input_ids(batch)).item()
                count += positions - out.shape[0]
            elif self.target.is_logits:
                total += kl_next_token(reference, out).item()
                count += positions
            else:
                total += (out.float() - reference.float()).pow(2).mean(-1).sum().item()
                count += positions
        return total / max(count, 1)


def _input_ids(batch) -> torch.Tensor:
    return batch["input_ids"] if isinstance(batch, dict) else batch


# ----------------------------------------------------------------------------------- search


@dataclasses.dataclass
class SearchStep:
    step: int
    pattern: str
    score: float
    turned: int | None  # the layer made S at this step (None: the all-F start)
    candidates: dict[int, float]  # every candidate tried at this step and its score


def resolve_target(target: str | float | int, num_dsa_layers: int) -> int:
    """``"2"``/``2`` → 2 F layers; ``"0.25"``/``0.25`` → a quarter of the DSA layers (at least 1)."""
    text = str(target)
    value = float(text)
    if "." in text or (isinstance(target, float) and not float(target).is_integer()) or 0 < value < 1:
        if not 0 < value <= 1:
            raise ValueError(f"target fraction {value} must be in (0, 1]")
        return max(1, round(value * num_dsa_layers))
    count = int(value)
    if not 1 <= count <= num_dsa_layers:
        raise ValueError(f"target {count} F layers must be between 1 and {num_dsa_layers}")
    return count


def greedy_search(
    evaluate: Callable[[str], float],
    num_layers: int,
    dsa_layers: list[int],
    target_f: int,
    fixed: dict[int, str] | None = None,
    progress: Callable[[int, int, int, int], None] | None = None,
    on_step: Callable[[SearchStep], None] | None = None,
) -> list[SearchStep]:
    """Greedy removal of F layers until ``target_f`` DSA layers are F; one step per removal.

    Ties go to the later layer. Layers in ``fixed`` and the first DSA layer stay F, so fewer steps
    than asked are taken when not enough layers may become S. ``progress(step, steps, done, total)``
    is called after each candidate, ``on_step`` after each step (and for the all-F start).
    """
    pattern = ["F"] * num_layers
    steps = [SearchStep(0, "".join(pattern), evaluate("".join(pattern)), None, {})]
    if on_step is not None:
        on_step(steps[0])
    movable = [layer for layer in dsa_layers[1:] if layer not in (fixed or {})]
    total_steps = min(len(dsa_layers) - target_f, len(movable))
    for step in range(1, total_steps + 1):
        candidates: dict[int, float] = {}
        for i, layer in enumerate(movable):
            trial = list(pattern)
            trial[layer] = "S"
            candidates[layer] = evaluate("".join(trial))
            if progress is not None:
                progress(step, total_steps, i + 1, len(movable))
        best = min(candidates, key=lambda layer: (candidates[layer], -layer))
        pattern[best] = "S"
        movable.remove(best)
        steps.append(SearchStep(step, "".join(pattern), candidates[best], best, candidates))
        if on_step is not None:
            on_step(steps[-1])
    return steps


# ----------------------------------------------------------------------------------- output


def uniform_pattern(num_layers: int, target_f: int) -> str | None:
    """The evenly spaced pattern (F at 0, freq, 2·freq, ...) with the same F count, if one exists."""
    for freq in range(1, num_layers + 1):
        config = IndexCacheConfig(use_index_cache=True, index_topk_freq=freq, index_skip_topk_offset=1)
        pattern = config.pattern_for(num_layers)
        if pattern.count("F") == target_f:
            return pattern
    return None


def save_plot(steps: list[SearchStep], path: str, metric: str, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = [s.step for s in steps]
    ys = [s.score for s in steps]
    ax.plot(xs, ys, marker="o")
    for s in steps:
        label = "all F" if s.turned is None else f"L{s.turned}→S"
        ax.annotate(label, (s.step, s.score), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("step (layers turned to S)")
    ax.set_ylabel(metric)
    ax.set_xticks(xs)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--keep", "--target", dest="keep", default="0.25",
                        help="F layers to keep: a count (2) or a fraction of the DSA layers (0.25, the default)")
    parser.add_argument("--objective", "--score", dest="objective", choices=["kl", "loss"], default="kl",
                        help="kl: KL of the next-token distribution vs all-F (default); "
                             "loss: LM loss with the calibration tokens as labels")
    parser.add_argument("--save", default=None, metavar="PATTERN.json",
                        help="write the choice (pattern, scores, model and calibration identity) as JSON: "
                             "IndexCacheBackend(pattern_file=...) compiles with it")
    add_plot_argument(parser, "the score after each search step")


def _write(line: str) -> None:
    """Print beside a progress bar without tearing it."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(line)
    except ImportError:
        print(line, flush=True)


def main(args: argparse.Namespace) -> int:
    from .pattern_choice import search_target

    if args.plot and (missing := missing_plot_support()):
        print(f"fx-indexcache search: {missing}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    target = build_target(args)
    start = time.perf_counter()
    try:
        scorer = PatternScorer(target, "kl")
    except RuntimeError as error:
        if "no DSA indexer top-k" not in str(error):
            raise
        from .pattern_choice import _no_dsa_error

        raise SystemExit(f"error: {_no_dsa_error(target.model)}") from None
    layers = scorer.layers
    try:
        target_f = resolve_target(args.keep, len(layers))
    except ValueError as error:
        raise SystemExit(f"error: --keep {args.keep}: {error}") from error
    fixed = scorer.fixed
    print(f"{target.name}: DSA layers {layers}; traced once in {time.perf_counter() - start:.1f} s; "
          f"{len(target.batches)} calibration batches; objective {args.objective}; target {target_f} F layers")
    for layer, why in sorted(fixed.items()):
        print(f"  layer {layer} stays F: {why}")

    def show(s: SearchStep) -> None:
        if s.turned is None:
            _write(f"step 0: {s.pattern}  {scorer.metric} = {s.score:.6g}")
            return
        tried = " ".join(f"{layer}:{value:.3g}" for layer, value in sorted(s.candidates.items()))
        _write(f"step {s.step}: layer {s.turned} -> S  {s.pattern}  {scorer.metric} = {s.score:.6g}"
               f"   [tried {tried}] ({time.perf_counter() - search_start:.1f} s)")

    search_start = time.perf_counter()
    evaluations = scorer.evaluations
    choice = search_target(target, keep=args.keep, objective=args.objective, progress=True, scorer=scorer,
                           on_step=show)
    if choice.f_layers > target_f:
        print(f"note: stopped at {choice.f_layers} F layers; the other layers must stay F (see above)")
    print(f"\n{scorer.evaluations - evaluations} pattern evaluations in {time.perf_counter() - search_start:.1f} s, "
          "no recompilation")
    if choice.uniform_pattern is not None and choice.uniform_pattern != choice.pattern:
        print(f"for comparison, evenly spaced {choice.uniform_pattern}: {choice.metric} = {choice.uniform_score:.6g}"
              f" (chosen: {choice.score:.6g})")
    print(f"\nbest pattern ({choice.f_layers} F of {len(layers)} DSA layers): {choice.pattern}")
    print(f"vLLM:   {choice.vllm_argument()}")
    print(f"SGLang: {choice.sglang_argument()}")
    if args.save:
        choice.save(args.save)
        print(f"saved to {args.save}: torch.compile(model, backend=IndexCacheBackend(pattern_file={args.save!r}))")
    if args.plot:
        save_plot(list(choice.steps), args.plot, choice.metric, f"{target.name}: greedy IndexCache search")
        print(f"plot saved to {args.plot}")
    return 0

