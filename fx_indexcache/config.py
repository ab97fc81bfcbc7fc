"""IndexCache configuration: which DSA layers compute their top-k (F) and which reuse it (S).

The keys and their meaning follow vLLM and SGLang exactly, so a model config or an
``--hf-overrides`` dict written for them drives this pass unchanged:

* ``index_topk_freq`` / ``index_skip_topk_offset``: layer ``i`` is F iff
  ``max(i - offset + 1, 0) % freq == 0`` (the default offset 2 makes layers 0 and 1 F);
* ``index_topk_pattern``: one ``F``/``S`` character per decoder layer, overrides freq/offset;
* ``indexer_types``: ``"full"``/``"shared"`` per layer, overrides everything else;
* a layer numbered at or past ``num_layers`` (an MTP / next-n layer) always computes.

vLLM 0.33 and SGLang 0.5.23 apply these keys without reading ``use_index_cache``; a model
config read by ``from_hf_config`` therefore switches IndexCache on when it carries them (GLM-5.2
ships ``index_topk_freq: 4, index_skip_topk_offset: 3`` and no ``use_index_cache``).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

class Mark(str, enum.Enum):
    """How the config marks one decoder layer: F computes its top-k, S reuses the nearest computing layer's.

    A ``str`` so that marks compare equal to the plain letters engines and patterns use."""

    F = "F"
    S = "S"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


FULL, SHARED = Mark.F, Mark.S

log = logging.getLogger(__name__)


class PatternSource(str, enum.Enum):
    """Which key decides the F/S pattern (SGLang's precedence), or that IndexCache is off."""

    OFF = "off (use_index_cache is false)"
    INDEXER_TYPES = "indexer_types"
    INDEX_TOPK_PATTERN = "index_topk_pattern"
    FREQ_OFFSET = "index_topk_freq / index_skip_topk_offset"


class Switch(str, enum.Enum):
    """Why ``use_index_cache`` has the value it has."""

    GIVEN = "use_index_cache given"
    DEFAULT = "default"
    IMPLIED_BY_KEYS = "implied by the IndexCache keys (vLLM and SGLang apply them without use_index_cache)"
    BACKEND = "on by default for the IndexCache backends and the export helper"

#: The keys that make a pattern: giving any of them (without use_index_cache) means IndexCache on.
PATTERN_KEYS = ("index_topk_freq", "index_skip_topk_offset", "index_topk_pattern", "indexer_types")

#: The keys this config reads from a model config, a dict or backend options.
CONFIG_KEYS = (
    "use_index_cache",
    "index_topk_freq",
    "index_skip_topk_offset",
    "index_topk_pattern",
    "indexer_types",
    "drop_shared_indexer_cache_writes",
    "fuse_indexer_kernel",
    "indexer_precision",
    "fuse_score_and_topk",
)

#: ``indexer_precision`` values: "bf16" is the exact path, "fp8" the serving engines' scoring (see the field).
INDEXER_PRECISIONS = ("bf16", "fp8")

_INDEXER_TYPES = {"full": FULL, "shared": SHARED}


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"IndexCache config: {key}={value!r} is not allowed; {key} must be {allowed}")


def _check_positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(key, value, "an int >= 1")
    return value


@dataclasses.dataclass(frozen=True)
class IndexCacheConfig:
    """Validated IndexCache settings; see the module docstring for the semantics.

    ``num_layers`` is the model's decoder-layer count when a model config tells it; a
    pattern of another length is then rejected. ``drop_shared_indexer_cache_writes`` says whether
    the pass also deletes the S layers' indexer key-cache writes, which nothing reads once those
    layers share indices (as the hand-written model, which has no S-layer indexer). Left at None it
    means "drop where proven": in a graph that holds every decoder layer of the model, so every S
    layer shares inside it and no cross-graph variant computes one, and no call of the model runs
    eagerly beside it (transformers' eager prefill); kept elsewhere, so the cache stays complete for
    whatever computes that layer. True drops wherever a layer shares, False never. ``fuse_indexer_kernel`` lets the F layers' scoring
    run as one fused Triton kernel where it is proven equivalent and supported (CUDA, bf16/fp16);
    elsewhere Inductor's code stays. Left at None it means "fuse when IndexCache is on": with
    ``use_index_cache=False`` the graph is then left exactly as it is, and only an explicit
    ``fuse_indexer_kernel=True`` substitutes the kernel on its own. ``indexer_precision`` is how the fused
    kernel scores: "bf16" (default) is the exact path; "fp8" quantises keys per token and queries per token
    and head to float8 e4m3 and multiplies them on fp8 tensor cores, as vLLM and DeepSeek's own inference run
    V3.2 -- it changes the scores (and some selected keys), so it is opt-in, and it applies only where the
    fused kernel runs (elsewhere the layer stays exact and the report's ``precision`` rows say why).
    ``fuse_score_and_topk`` (opt-in) makes an F layer whose score only its top-k's indices read one
    ``indexer_topk_fused`` op, which writes no logits; off, such a layer runs the logits kernel and the top-k
    kernel, which on an H100 measured faster (0.52x the two kernels' speed at 1K x 32K prefill and 0.70x at
    16 x 32K decode for the one op: docs/kernels.md). ``switch`` records why
    ``use_index_cache`` is what it is (not part of the semantics, nor of the fingerprint).
    """

    use_index_cache: bool | None = None  # None: on exactly when a pattern key is given (see Switch)
    index_topk_freq: int = 1
    index_skip_topk_offset: int = 2
    index_topk_pattern: str | None = None
    indexer_types: tuple[str, ...] | None = None
    num_layers: int | None = None
    drop_shared_indexer_cache_writes: bool | None = None  # None: drop where proven (see above)
    fuse_indexer_kernel: bool | None = None
    indexer_precision: str = "bf16"
    fuse_score_and_topk: bool = False
    switch: Switch = dataclasses.field(default=Switch.GIVEN, compare=False)

    def __post_init__(self) -> None:
        if self.use_index_cache is None:  # one rule for "on" everywhere: keys given mean IndexCache on
            keyed = self._pattern_keys_given()
            object.__setattr__(self, "use_index_cache", keyed)
            object.__setattr__(self, "switch", Switch.IMPLIED_BY_KEYS if keyed else Switch.DEFAULT)
        if not isinstance(self.use_index_cache, bool):
            raise _bad("use_index_cache", self.use_index_cache, "a bool")
        if self.drop_shared_indexer_cache_writes is not None and not isinstance(
                self.drop_shared_indexer_cache_writes, bool):
            raise _bad("drop_shared_indexer_cache_writes", self.drop_shared_indexer_cache_writes,
                       "a bool, or None (drop where the graph proves nothing else computes the layer)")
        if self.fuse_indexer_kernel is not None and not isinstance(self.fuse_indexer_kernel, bool):
            raise _bad("fuse_indexer_kernel", self.fuse_indexer_kernel, "a bool or None (fuse when IndexCache is on)")
        if not isinstance(self.indexer_precision, str) or self.indexer_precision not in INDEXER_PRECISIONS:
            raise _bad("indexer_precision", self.indexer_precision,
                       'one of "bf16" (exact, the default) or "fp8" (e4m3 keys with per-token scales, fused kernel only)')
        if not isinstance(self.fuse_score_and_topk, bool):
            raise _bad("fuse_score_and_topk", self.fuse_score_and_topk,
                       "a bool (score + top-k in one op where only the indices are read; off by default)")
        _check_positive_int("index_topk_freq", self.index_topk_freq)
        _check_positive_int("index_skip_topk_offset", self.index_skip_topk_offset)
        if self.num_layers is not None:
            _check_positive_int("num_layers", self.num_layers)
        if self.index_topk_pattern is not None:
            pattern = self.index_topk_pattern
            if not isinstance(pattern, str) or not pattern or set(pattern) - {FULL, SHARED}:
                raise _bad("index_topk_pattern", pattern, "a non-empty string of 'F' and 'S' characters")
            self._check_length("index_topk_pattern", pattern, len(pattern))
        if self.indexer_types is not None:
            types = self.indexer_types
            if isinstance(types, str) or not isinstance(types, Sequence) or not types:
                raise _bad("indexer_types", types, 'a non-empty list of "full" / "shared"')
            for entry in types:
                if entry not in _INDEXER_TYPES:
                    raise _bad("indexer_types", types, f'a list of "full" / "shared" (found {entry!r})')
            object.__setattr__(self, "indexer_types", tuple(types))
            self._check_length("indexer_types", types, len(types))

    def _pattern_keys_given(self) -> bool:
        """Whether any key that makes a pattern differs from its default (an all-F ``index_topk_freq=1`` does not)."""
        return (self.index_topk_freq != 1 or self.index_skip_topk_offset != 2 or self.index_topk_pattern is not None
                or self.indexer_types is not None)

    def _check_length(self, key: str, value: Any, length: int) -> None:
        if self.num_layers is not None and length != self.num_layers:
            raise _bad(key, value, f"one entry per decoder layer: {self.num_layers} entries, not {length}")

    # ------------------------------------------------------------------ semantics
    @property
    def explicit_pattern(self) -> str | None:
        """The per-layer pattern given by ``indexer_types`` or ``index_topk_pattern`` (in that precedence)."""
        if self.indexer_types is not None:
            return "".join(_INDEXER_TYPES[t] for t in self.indexer_types)
        return self.index_topk_pattern

    @property
    def pattern_source(self) -> PatternSource:
        """The key that decides the pattern, in SGLang's precedence."""
        if not self.use_index_cache:
            return PatternSource.OFF
        if self.indexer_types is not None:
            return PatternSource.INDEXER_TYPES
        if self.index_topk_pattern is not None:
            return PatternSource.INDEX_TOPK_PATTERN
        return PatternSource.FREQ_OFFSET

    @property
    def fuses_kernel(self) -> bool:
        """Whether F layers' scoring may be swapped for the fused kernel (where supported)."""
        if self.fuse_indexer_kernel is None:
            return self.use_index_cache
        return self.fuse_indexer_kernel

    def layer_kind(self, layer: int) -> str:
        """``"F"`` or ``"S"`` for global decoder-layer index ``layer``, before any safety demotion.

        A layer at or past ``num_layers`` is an MTP / next-n layer: vLLM always builds its
        indexer, so it is F whatever the pattern says.
        """
        if layer < 0:
            raise ValueError(f"IndexCache config: layer index {layer} is negative; layer indices start at 0")
        if not self.use_index_cache:
            return FULL
        if self.num_layers is not None and layer >= self.num_layers:
            return FULL
        pattern = self.explicit_pattern
        if pattern is not None:
            if layer >= len(pattern):
                raise self.pattern_length_error(layer + 1, exact=False)
            return Mark(pattern[layer])
        phase = max(layer - self.index_skip_topk_offset + 1, 0)
        return FULL if phase % self.index_topk_freq == 0 else SHARED

    def pattern_length_error(self, model_layers: int, *, exact: bool = True) -> ValueError:
        """The one error for a pattern whose length is not the model's decoder-layer count.

        ``exact``: ``model_layers`` is the model's layer count (from its config); otherwise it is a lower bound
        (the graph holds DSA layer ``model_layers - 1``)."""
        key = "indexer_types" if self.indexer_types is not None else "index_topk_pattern"
        value = self.indexer_types if self.indexer_types is not None else self.index_topk_pattern
        count = f"{model_layers} decoder layers" if exact else f"at least {model_layers} decoder layers"
        return ValueError(
            f"IndexCache config: {key}={value!r} has {len(value or ())} entries but the model has {count}; {key} must have one "
            f"entry per decoder layer (dense and sliding-window layers included), as vLLM and SGLang read it"
        )

    def check_model_layers(self, model_layers: int | None) -> None:
        """Raise ``pattern_length_error`` when an explicit pattern's length is not ``model_layers``."""
        pattern = self.explicit_pattern
        if self.use_index_cache and pattern is not None and model_layers is not None and len(pattern) != model_layers:
            raise self.pattern_length_error(model_layers)

    def buffer_sources(self, indexed_layers: Sequence[int]) -> dict[int, int]:
        """The engines' one-buffer rule over a model's indexed layers (all of them): the layer each one's indices
        come from.

        vLLM and SGLang keep one top-k buffer that only computing indexed layers write; an S layer reads it. So an
        indexed layer computes when it is marked F, or when no indexed layer before it computed (engines would read
        an unset buffer there; we never do), and otherwise uses the nearest preceding indexed layer that computed,
        whatever the layers between (dense, sliding-window, linear) are marked.
        """
        uses: dict[int, int] = {}
        writer = None
        for layer in sorted(indexed_layers):
            if writer is None or self.layer_kind(layer) == FULL:
                writer = layer
            uses[layer] = writer
        return uses

    def pattern_for(self, num_layers: int) -> str:
        """The F/S string for layers ``0..num_layers-1`` as the config states it."""
        return "".join(self.layer_kind(i) for i in range(num_layers))

    def executed_pattern(self, num_layers: int) -> str:
        """The pattern a whole-model graph runs: an S with no F before it is computed as F.

        This is what the hand-written model-level IndexCache must run to match the pass (every layer indexed).
        """
        uses = self.buffer_sources(range(num_layers))
        return "".join(FULL if uses[i] == i else SHARED for i in range(num_layers))

    def source_layer(self, layer: int) -> int | None:
        """The F layer whose indices S layer ``layer`` reuses: the nearest preceding F, or None."""
        for candidate in range(layer - 1, -1, -1):
            if self.layer_kind(candidate) == FULL:
                return candidate
        return None

    def fingerprint(self) -> str:
        """A stable string covering every field that shapes the graph; part of the pass's cache key."""
        fields = dataclasses.asdict(self)
        fields.pop("switch")
        return json.dumps(fields, sort_keys=True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_config(cls, config: Any, **overrides: Any) -> IndexCacheConfig:
        """Read the IndexCache keys from a transformers config, its ``text_config``, or a dict.

        A plain dict (vLLM's ``--hf-overrides``) and config objects are both accepted; keys
        absent everywhere keep their defaults. ``num_layers`` comes from
        ``num_hidden_layers`` when present, so a pattern of the wrong length is rejected.
        The result is the pattern vLLM and SGLang run for this config: the pattern keys apply
        without ``use_index_cache``; an explicit ``use_index_cache: false`` still turns them off
        here, with a warning that those engines would apply them. ``overrides`` win over the
        config and count as given.
        """
        values = read_config_keys(config)
        values.update(overrides)
        keyed = [key for key in PATTERN_KEYS if values.get(key) is not None]
        if "use_index_cache" not in values:
            implied = bool(keyed)
            values["use_index_cache"] = implied
            values["switch"] = Switch.IMPLIED_BY_KEYS if implied else Switch.DEFAULT
        elif values["use_index_cache"] is False and "use_index_cache" not in overrides:
            engines = cls(**{**values, "use_index_cache": True}).pattern_for(_layers_to_show(values))
            if SHARED in engines:
                log.warning(
                    "fx_indexcache: the model config sets use_index_cache=false next to %s; IndexCache stays off "
                    "here, but vLLM and SGLang do not read use_index_cache and would run pattern %s",
                    ", ".join(keyed), engines,
                )
        return cls(**values)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> tuple[IndexCacheConfig, dict[str, Any]]:
        """Split backend ``options`` into an IndexCache config and the remaining Inductor options.

        Without any IndexCache key the paper's 1/4 setting applies (freq 4); passing options
        to this backend means the user wants IndexCache, so ``use_index_cache`` defaults to True.
        """
        options = dict(options or {})
        mine = {key: options.pop(key) for key in (*CONFIG_KEYS, "num_layers") if key in options}
        if "use_index_cache" not in mine:
            mine["use_index_cache"], mine["switch"] = True, Switch.BACKEND
        if not any(k in mine for k in ("index_topk_freq", "index_topk_pattern", "indexer_types")):
            mine["index_topk_freq"] = 4
        return cls(**mine), options

    @classmethod
    def from_keys(cls, **keys: Any) -> IndexCacheConfig:
        """Keyword keys as every entry point takes them: any key given switches IndexCache on
        unless ``use_index_cache`` is given too (no keys at all: the all-F default)."""
        check_keys(keys, "IndexCache config", allowed=(*CONFIG_KEYS, "num_layers"))
        if not keys:
            return cls(switch=Switch.DEFAULT)
        if "use_index_cache" not in keys:
            keys["use_index_cache"], keys["switch"] = True, Switch.IMPLIED_BY_KEYS
        return cls(**keys)

    @classmethod
    def coerce(cls, config: IndexCacheConfig | Mapping[str, Any] | None, keys: Mapping[str, Any], where: str,
               *, default_on: bool = False) -> IndexCacheConfig:
        """A config from what an entry point was given: a config, a dict of keys, or keyword keys (not two of them).

        ``default_on``: with no pattern key at all, the backend's default (freq 4, on) applies, as for the
        backends and the export helper."""
        if config is not None and keys:
            raise TypeError(f"{where}: give a config or keyword keys, not both (got config and {sorted(keys)})")
        if isinstance(config, IndexCacheConfig):
            return config
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"{where}: config={config!r} is not allowed; it must be an IndexCacheConfig, a dict of "
                            f"IndexCache keys, or keyword keys")
        given = dict(config if config is not None else keys)
        check_keys(given, where, allowed=(*CONFIG_KEYS, "num_layers"))
        if default_on:
            made, _ = cls.from_options(given)
            return made
        return cls.from_keys(**given)


def check_keys(keys: Mapping[str, Any], where: str, allowed: Sequence[str], *, others: Sequence[str] = (),
               others_name: str = "") -> None:
    """Refuse a key that is neither in ``allowed`` nor in ``others``, naming the nearest valid one."""
    for key in keys:
        if key in allowed or key in others:
            continue
        near = difflib.get_close_matches(str(key), [*allowed, *others], n=1, cutoff=0.75)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        also = f", or {others_name}" if others_name else ""
        raise ValueError(f"{where}: unknown key {key!r}{hint}; allowed are the IndexCache keys {list(allowed)}{also}")


def _layers_to_show(values: Mapping[str, Any]) -> int:
    """How many layers a message about this config should spell out."""
    if values.get("num_layers") is not None:
        return values["num_layers"]
    for key in ("indexer_types", "index_topk_pattern"):
        if values.get(key) is not None:
            return len(values[key])
    return 16


def read_config_keys(config: Any) -> dict[str, Any]:
    """The keys present in ``config`` or its ``text_config`` (outer first), ``num_layers`` included."""
    sources = [config]
    nested = _get(config, "text_config")
    if nested is not None:
        sources.append(nested)
    values: dict[str, Any] = {}
    for key in (*CONFIG_KEYS, "num_hidden_layers"):
        for source in sources:
            value = _get(source, key)
            if value is not None:
                values[key] = value
                break
    num_layers = values.pop("num_hidden_layers", None)
    if num_layers is not None:
        values["num_layers"] = num_layers
    return values


def _get(source: Any, key: str) -> Any:
    if isinstance(source, Mapping):
        return source.get(key)
    return getattr(source, key, None)
