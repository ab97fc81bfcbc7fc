"""Choose an IndexCache pattern for a model on calibration data, and the record that carries it to compile and serve.

``measure_overlap(model, batches)`` and ``search_pattern(model, batches, keep=..., objective=...)`` take any torch
module the pass detects (a transformers DSA model, the built-in reference model, a hand-written one) as it is: the
model is compiled once with the recording probe (``probe.IndexProbe``) and called on each batch. A batch is a
``LongTensor [B, S]`` of token ids or a dict of keyword inputs; a transformers model gets ``input_ids=`` and
``use_cache=False``, any other module the tensor positionally. Its output is read as next-token logits (a tensor, a
tuple's first entry, or ``.logits``), or as hidden states (``.last_hidden_state``, then scored by MSE).

``search_pattern`` returns a ``PatternChoice``: the pattern, every greedy step's scores, the evenly spaced pattern's
score at the same budget, and what it was made from (model class, a digest of its config, a digest of the
calibration tokens, this library's version). ``save``/``load`` keep it as JSON; ``hf_overrides()`` is the dict
vLLM's ``--hf-overrides`` and SGLang's ``--json-model-override-args`` both take; ``check(model)`` refuses a model
of another class or layer count; ``IndexCacheBackend(pattern_file=...)`` compiles with it.

Memory: one batch's layer indices (``[B, S, k]`` per DSA layer) and the all-F outputs are held; activations are
those of one inference call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import CONFIG_KEYS, FULL, IndexCacheConfig
from ..context import layer_count_of
from .calibration import ProbeTarget, compile_probe
from .overlap import OverlapAccumulator, OverlapResult
from .pattern_search import PatternScorer, SearchStep, greedy_search, resolve_target, uniform_pattern

log = logging.getLogger(__name__)

FORMAT = "fx_indexcache.pattern_choice.v1"
OBJECTIVES = ("kl", "loss")

#: Config entries that say nothing about the network itself (where it was loaded from, which attention kernel,
#: the dtype asked for, the IndexCache keys): left out of the config digest, so a saved and reloaded model, or one
#: with IndexCache switched on, has the digest of the one searched.
_VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype", "architectures", "auto_map",
    "_commit_hash", "use_cache", "num_layers_searched", *CONFIG_KEYS,
})


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("fx-indexcache")
    except Exception:  # not installed (a source checkout on PYTHONPATH)
        return "unknown (not installed)"


# ---------------------------------------------------------------------------------------------- model identity


def _config_of(model: torch.nn.Module) -> Any:
    return getattr(model, "config", None)


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        raw = config.to_dict()
    elif dataclasses.is_dataclass(config):
        raw = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raw = {key: value for key, value in vars(config).items() if not key.startswith("_")}
    return raw


def _clean(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))
                if str(k) not in _VOLATILE_CONFIG_KEYS and not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def config_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's config (``model.config``: a transformers config, a dataclass or a dict), less the
    entries that do not describe the network (``_VOLATILE_CONFIG_KEYS``); of the class name when it has none."""
    payload = json.dumps({"class": type(model).__name__, "config": _clean(_config_dict(_config_of(model)))},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def model_type_of(config: Any) -> str | None:
    if config is None:
        return None
    value = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    return value or None


# ---------------------------------------------------------------------------------------------- calling a model


def _is_transformers_model(model: torch.nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _read_output(output: Any) -> tuple[torch.Tensor, bool]:
    """(tensor, is_logits) from what a model returned."""
    if isinstance(output, torch.Tensor):
        return output, True
    for name, is_logits in (("logits", True), ("last_hidden_state", False)):
        value = getattr(output, name, None)
        if value is None and isinstance(output, Mapping):
            value = output.get(name)
        if isinstance(value, torch.Tensor):
            return value, is_logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0], True
    raise TypeError(f"the model returned {type(output).__name__}: expected next-token logits (a tensor, a tuple "
                    "whose first entry is one, or an object with .logits) or an object with .last_hidden_state")


class _Caller:
    """``(fn, batch) -> output tensor``: how this model is called on one calibration batch; ``is_logits`` says what
    the last call returned (logits, or hidden states read from ``.last_hidden_state``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.transformers_style = _is_transformers_model(model)
        self.is_logits = True

    def __call__(self, fn, batch) -> torch.Tensor:
        if isinstance(batch, Mapping):
            kwargs = dict(batch)
            if self.transformers_style:
                kwargs.setdefault("use_cache", False)
            output = fn(**kwargs)
        elif self.transformers_style:
            output = fn(input_ids=batch, use_cache=False)
        else:
            output = fn(batch)
        tensor, self.is_logits = _read_output(output)
        return tensor


def _input_ids(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        return batch.get("input_ids")
    return batch if isinstance(batch, torch.Tensor) else None


def _vocab_size(model: torch.nn.Module) -> int | None:
    config = _config_of(model)
    for source in (config, getattr(config, "text_config", None)):
        value = source.get("vocab_size") if isinstance(source, Mapping) else getattr(source, "vocab_size", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_batches(model: torch.nn.Module, batches: Any) -> list[Any]:
    """The calibration batches as a list, after checking each holds integer token ids the model's vocabulary has."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]  # one [B, S] batch
    elif isinstance(batches, Mapping):
        batches = [batches]
    elif not isinstance(batches, Iterable):
        raise TypeError(f"batches={type(batches).__name__}: expected a list of LongTensor [B, S] or of input dicts")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: the search needs at least one calibration batch")
    vocab = _vocab_size(model)
    for number, batch in enumerate(batches):
        ids = _input_ids(batch)
        if not isinstance(batch, (torch.Tensor, Mapping)):
            raise TypeError(f"batches[{number}] is a {type(batch).__name__}: expected a LongTensor [B, S] or a dict "
                            "of keyword inputs")
        if ids is None:
            continue  # keyword inputs without input_ids (inputs_embeds ...): the model checks them
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 2:
            raise ValueError(f"batches[{number}]: token ids must be an integer tensor [B, S], "
                             f"got {ids.dtype} of shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
            raise ValueError(f"batches[{number}]: token ids span {int(ids.min())}..{int(ids.max())}; the model's "
                             f"vocabulary is 0..{vocab - 1 if vocab else '?'}")
    return batches


def calibration_digest(batches: list[Any]) -> str:
    """SHA-256 over every batch's tensors (name, dtype, shape, bytes), in order: which data a pattern was chosen on."""
    digest = hashlib.sha256()
    for number, batch in enumerate(batches):
        items = sorted(batch.items()) if isinstance(batch, Mapping) else [("input_ids", batch)]
        for name, value in items:
            if not isinstance(value, torch.Tensor):
                digest.update(f"{number}|{name}|{value!r}|".encode())
                continue
            tensor = value.detach().contiguous().cpu()
            digest.update(f"{number}|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _target(model: torch.nn.Module, batches: list[Any]) -> ProbeTarget:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model is a {type(model).__name__}: expected a torch.nn.Module")
    num_layers = layer_count_of(_config_of(model)) or 0  # 0: not stated; filled in from the traced graph
    return ProbeTarget(type(model).__name__, model, num_layers, batches, _Caller(model))


def _no_dsa_error(model: torch.nn.Module) -> ValueError:
    return ValueError(
        f"{type(model).__name__}: no DSA lightning-indexer top-k found in the compiled graph(s); looked for an "
        "aten.topk over ReLU(q·k)-weighted scores inside each decoder layer (the site finders of "
        "fx_indexcache.detection), and for a layer number in each site's module path (layers.N)"
    )


def _progress(total: int, description: str, show: bool):
    """A tqdm bar (``update()``, ``close()``; shown on a terminal only), or a do-nothing one when asked for none or
    tqdm is missing."""
    if show:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=description, unit="run", leave=False, disable=None)
        except ImportError:
            pass

    class _Silent:
        def update(self, n: int = 1) -> None:
            pass

        def set_postfix_str(self, text: str) -> None:
            pass

        def close(self) -> None:
            pass

    return _Silent()


# ---------------------------------------------------------------------------------------------- overlap


def measure_overlap(model: torch.nn.Module, batches: Any, *, progress: bool = False) -> OverlapResult:
    """Layer × layer overlap of the DSA layers' top-k selections on ``batches``, every layer computing its own.

    ``OverlapResult.matrix[i, j]`` is the mean over queries that see at least k keys of |A ∩ B| / k; ``adjacent``
    lists consecutive DSA layers. One batch's indices are held at a time.
    """
    return overlap_of(_target(model, _check_batches(model, batches)), progress=progress)


@torch.no_grad()
def overlap_of(target: ProbeTarget, *, progress: bool = False) -> OverlapResult:
    """``measure_overlap`` on a ``ProbeTarget`` (the CLI's form: a model, its batches, how to call it)."""
    probe, compiled = compile_probe(target, switchable=False)
    accumulator = OverlapAccumulator()
    bar = _progress(len(target.batches), "overlap (the first batch traces the model)", progress)
    try:
        with target.context(), probe.use(None):
            for batch in target.batches:
                probe.clear()
                target.call(compiled, batch)
                if not probe.records:
                    raise _no_dsa_error(target.model)
                accumulator.add(probe.records)
                probe.clear()
                bar.update()
    finally:
        bar.close()
    return accumulator.result()


# ---------------------------------------------------------------------------------------------- the record


@dataclasses.dataclass(frozen=True)
class StepScore:
    """One greedy step: the pattern after it, its score, the layer it made S, and every candidate's score."""

    step: int
    pattern: str
    score: float
    turned: int | None  # None: the all-F start
    candidates: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class PatternChoice:
    """A searched IndexCache pattern and what it was chosen on; ``save``/``load`` as JSON.

    ``score`` is the objective of ``pattern`` on the calibration batches (``metric`` says which), ``uniform_score``
    that of ``uniform_pattern``, the evenly spaced pattern with the same number of F layers (None where no evenly
    spaced pattern has that count, or it would make a layer S that must stay F).
    """

    pattern: str
    num_layers: int
    dsa_layers: tuple[int, ...]
    objective: str
    metric: str
    score: float
    uniform_pattern: str | None
    uniform_score: float | None
    steps: tuple[StepScore, ...]
    fixed: tuple[tuple[int, str], ...]  # layers that had to stay F, and why
    model_class: str
    model_type: str | None  # the config's model_type, where it has one
    config_digest: str
    calibration_digest: str
    calibration_tokens: int
    library_version: str
    format: str = FORMAT

    @property
    def f_layers(self) -> int:
        return sum(self.pattern[layer] == FULL for layer in self.dsa_layers)

    # ------------------------------------------------------------------ engines
    def hf_overrides(self) -> dict[str, Any]:
        """The keys vLLM (``--hf-overrides``) and SGLang (``--json-model-override-args``) read, as a dict."""
        return {"use_index_cache": True, "index_topk_pattern": self.pattern}

    def vllm_argument(self) -> str:
        return f"--hf-overrides '{json.dumps(self.hf_overrides())}'"

    def sglang_argument(self) -> str:
        return f"--json-model-override-args '{json.dumps(self.hf_overrides())}'"

    def index_cache_options(self) -> dict[str, Any]:
        """The IndexCache backend options this choice stands for: the pattern and the layer count it was made for."""
        return {"index_topk_pattern": self.pattern, "num_layers": self.num_layers}

    # ------------------------------------------------------------------ checks
    def check(self, model: torch.nn.Module) -> None:
        """Refuse ``model`` unless it is of the class and layer count this pattern was chosen for (naming both).

        A differing config digest (another size, a changed field) only warns: fine-tunes of one architecture share
        a config, and the pattern is still well-formed for them.
        """
        if type(model).__name__ != self.model_class:
            raise ValueError(f"pattern file is for model class {self.model_class!r} ({self.num_layers} layers), "
                             f"not {type(model).__name__!r}")
        layers = layer_count_of(_config_of(model))
        if layers is not None and layers != self.num_layers:
            raise ValueError(f"pattern file is for {self.num_layers} decoder layers of {self.model_class}; this "
                             f"model has {layers}")
        if config_digest(model) != self.config_digest:
            log.warning("fx_indexcache: %s's config differs from the one pattern %s was chosen on (config digest "
                        "%s..., chosen on %s...)", type(model).__name__, self.pattern, config_digest(model)[:12],
                        self.config_digest[:12])

    def check_config(self, config: Any) -> None:
        """Refuse a model config of another model type or layer count than this pattern was chosen for."""
        model_type = model_type_of(config)
        if model_type is not None and self.model_type is not None and model_type != self.model_type:
            raise ValueError(f"pattern file is for model_type {self.model_type!r} ({self.model_class}), "
                             f"not {model_type!r}")
        architectures = (config.get("architectures") if isinstance(config, Mapping)
                         else getattr(config, "architectures", None)) or []
        if architectures and self.model_class not in architectures and self.model_type is None:
            raise ValueError(f"pattern file is for model class {self.model_class!r}, not {list(architectures)}")
        layers = layer_count_of(config)
        if layers is not None and layers != self.num_layers:
            raise ValueError(f"pattern file is for {self.num_layers} decoder layers of {self.model_class}; the "
                             f"config has num_hidden_layers={layers}")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["dsa_layers"] = list(self.dsa_layers)
        record["fixed"] = {str(layer): why for layer, why in self.fixed}
        record["steps"] = [
            {"step": s.step, "pattern": s.pattern, "score": s.score, "turned": s.turned,
             "candidates": {str(layer): score for layer, score in s.candidates}}
            for s in self.steps
        ]
        record["hf_overrides"] = self.hf_overrides()  # for reading only; load() derives it again
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], source: str = "pattern record") -> PatternChoice:
        if not isinstance(record, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(record).__name__}")
        if record.get("format") != FORMAT:
            raise ValueError(f"{source}: field 'format' is {record.get('format')!r}, expected {FORMAT!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(record) - {"format"})
        if missing:
            raise ValueError(f"{source}: fields {missing} are missing")
        try:
            values = {name: record[name] for name in names}
            values["dsa_layers"] = tuple(int(layer) for layer in record["dsa_layers"])
            values["fixed"] = tuple((int(layer), str(why)) for layer, why in dict(record["fixed"]).items())
            values["steps"] = tuple(
                StepScore(int(s["step"]), str(s["pattern"]), float(s["score"]),
                          None if s["turned"] is None else int(s["turned"]),
                          tuple((int(layer), float(score)) for layer, score in dict(s["candidates"]).items()))
                for s in record["steps"]
            )
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise ValueError(f"{source}: malformed field ({type(error).__name__}: {error})") from error
        choice = cls(**values)
        choice._validate(source)
        return choice

    def _validate(self, source: str) -> None:
        pattern, n = self.pattern, self.num_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{source}: field 'num_layers' is {n!r}; allowed: an int >= 1")
        if not isinstance(pattern, str) or not pattern or set(pattern) - {"F", "S"} or len(pattern) != n:
            raise ValueError(f"{source}: field 'pattern' is {pattern!r}; allowed: {n} characters of F and S "
                             f"(one per decoder layer)")
        if any(not 0 <= layer < n for layer in self.dsa_layers):
            raise ValueError(f"{source}: field 'dsa_layers' {list(self.dsa_layers)} holds layers outside 0..{n - 1}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"{source}: field 'objective' is {self.objective!r}; allowed: {list(OBJECTIVES)}")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PatternChoice:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise ValueError(f"pattern file {path}: cannot be read ({error.strerror or error})") from error
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"pattern file {path}: not JSON ({error}); truncated?") from error
        return cls.from_dict(record, f"pattern file {path}")


# ---------------------------------------------------------------------------------------------- search


def search_pattern(
    model: torch.nn.Module,
    batches: Any,
    *,
    keep: int | float | str = 0.25,
    objective: str = "kl",
    progress: bool = False,
) -> PatternChoice:
    """Greedy training-free search (the paper's): from all F, turn to S, one layer a step, the layer whose sharing
    moves the objective least, until ``keep`` DSA layers are F.

    ``keep``: a count of F layers (``4``) or a fraction of the DSA layers (``0.25``). ``objective``: ``"kl"``, the
    KL divergence of the next-token distribution from the all-F model's (MSE for a model returning hidden states),
    or ``"loss"``, the LM loss with the batches' own next tokens as labels. The model is traced once; every
    candidate runs on that graph with the IndexCache semantics of its pattern.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not allowed; objective must be one of {list(OBJECTIVES)}")
    return search_target(_target(model, _check_batches(model, batches)), keep=keep, objective=objective,
                         progress=progress)


def search_target(
    target: ProbeTarget,
    *,
    keep: int | float | str = 0.25,
    objective: str = "kl",
    progress: bool = False,
    scorer: PatternScorer | None = None,
    on_step: Callable[[SearchStep], None] | None = None,
) -> PatternChoice:
    """``search_pattern`` on a ``ProbeTarget`` (the CLI's form); ``scorer``: one already traced for ``target``,
    ``on_step``: called after each greedy step (and for the all-F start)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not allowed; objective must be one of {list(OBJECTIVES)}")
    model = target.model
    if scorer is None:
        bar = _progress(len(target.batches), "tracing; all-F reference outputs", progress)
        try:
            scorer = PatternScorer(target, "kl")  # traces; the all-F outputs are the KL reference
        except RuntimeError as error:
            if "no DSA indexer top-k" in str(error):
                raise _no_dsa_error(model) from None
            raise
        finally:
            bar.update(len(target.batches))
            bar.close()
    if isinstance(target.call, _Caller):
        target.is_logits = target.call.is_logits  # what the traced calls returned
    if objective == "loss":
        if not target.is_logits:
            raise ValueError(f"{target.name} returns hidden states, not logits: use objective='kl' (MSE then)")
        scorer.score = "loss"
    layers = scorer.layers
    if not layers:
        raise _no_dsa_error(model)
    if not target.num_layers:
        target.num_layers = max(layers) + 1
    elif max(layers) >= target.num_layers:
        raise ValueError(f"{target.name}: the graph holds DSA layer {max(layers)}, past the config's "
                         f"{target.num_layers} decoder layers")
    target_f = resolve_target(keep, len(layers))
    fixed = scorer.fixed
    movable = [layer for layer in layers[1:] if layer not in fixed]
    steps_to_take = min(len(layers) - target_f, len(movable))
    total = 1 + sum(len(movable) - step for step in range(steps_to_take)) + 1
    bar = _progress(total, f"greedy search to {target_f} F of {len(layers)} DSA layers", progress)

    def scored(pattern: str) -> float:
        value = scorer(pattern)
        bar.update()
        return value

    try:
        steps = greedy_search(scored, target.num_layers, layers, target_f, fixed, on_step=on_step)
        final = steps[-1]
        uniform = uniform_pattern(target.num_layers, final.pattern.count(FULL))
        uniform_ok = uniform is not None and all(uniform[layer] == FULL for layer in fixed)
        uniform_score = scored(uniform) if uniform_ok else None
    finally:
        bar.close()
    ids = [_input_ids(batch) for batch in target.batches]
    return PatternChoice(
        pattern=final.pattern,
        num_layers=target.num_layers,
        dsa_layers=tuple(layers),
        objective=objective,
        metric=scorer.metric,
        score=_finite(final.score),
        uniform_pattern=uniform if uniform_ok else None,
        uniform_score=uniform_score,
        steps=tuple(_step_record(step) for step in steps),
        fixed=tuple(sorted(fixed.items())),
        model_class=type(model).__name__,
        model_type=model_type_of(_config_of(model)),
        config_digest=config_digest(model),
        calibration_digest=calibration_digest(target.batches),
        calibration_tokens=sum(int(i.numel()) for i in ids if i is not None),
        library_version=library_version(),
    )


def _step_record(step: SearchStep) -> StepScore:
    return StepScore(step.step, step.pattern, _finite(step.score), step.turned,
                     tuple((layer, _finite(score)) for layer, score in sorted(step.candidates.items())))


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"a pattern scored {value}: the model's outputs are not finite on the calibration batches")
    return value


# ---------------------------------------------------------------------------------------------- backend options

#: The keys that state a pattern (a pattern file replaces them all).
_PATTERN_OPTION_KEYS = ("index_topk_pattern", "index_topk_freq", "index_skip_topk_offset", "indexer_types")


def pattern_file_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Backend ``options`` with ``pattern_file`` replaced by the file's ``index_topk_pattern`` and ``num_layers``.

    The file's layer count becomes the config's ``num_layers``: a ``num_layers`` given beside it must agree, and a
    pattern key given beside it is refused (two patterns). The model class is checked by ``PatternChoice.check``
    (the backend sees graphs, not the model) or, against a config, by ``IndexCacheBackend.from_config``.
    """
    options = dict(options)
    path = options.pop("pattern_file", None)
    if path is None:
        return options
    choice = PatternChoice.load(path)
    clash = [key for key in _PATTERN_OPTION_KEYS if key in options]
    if clash:
        raise ValueError(f"pattern_file={str(path)!r} sets the pattern; {clash} given beside it: give one or the other")
    given = options.get("num_layers")
    if given is not None and given != choice.num_layers:
        raise ValueError(f"pattern file {path} is for {choice.num_layers} decoder layers of {choice.model_class}; "
                         f"num_layers={given!r} was given")
    options.update(choice.index_cache_options())
    return options


def options_from_config(config: Any, pattern_file: str | Path | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """Backend options from a model config, read as vLLM and SGLang read it, then a pattern file, then ``options``.

    The config's IndexCache keys (``IndexCacheConfig.from_hf_config``: a pattern key alone switches IndexCache on)
    and its layer count (``num_hidden_layers``, or the reference model's ``num_layers``) become the options, so no
    variant is compiled for layers the model does not have; without IndexCache keys the backend's default (freq 4)
    applies. ``pattern_file`` replaces the config's pattern after its model type and layer count are checked against
    the config; explicit ``options`` win over the config (a pattern key beside ``pattern_file`` is refused).
    """
    from ..config import read_config_keys

    IndexCacheConfig.from_hf_config(config)  # a bad key in the config fails here, naming it
    read = {key: value for key, value in read_config_keys(config).items() if value is not None}
    layers = layer_count_of(config)
    if layers is not None:
        read["num_layers"] = layers
    if pattern_file is not None:
        PatternChoice.load(pattern_file).check_config(config)
        read = {key: value for key, value in read.items() if key not in _PATTERN_OPTION_KEYS}
        read["pattern_file"] = pattern_file
    if any(key in options for key in _PATTERN_OPTION_KEYS):  # an explicit pattern replaces the config's
        read = {key: value for key, value in read.items() if key not in _PATTERN_OPTION_KEYS}
    read.update(options)  # a pattern option beside pattern_file is refused by pattern_file_options
    return read
