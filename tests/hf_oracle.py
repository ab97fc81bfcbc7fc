"""Test machinery for the tiny transformers DSA models: the IndexCache oracle and a pattern-switching backend.

``fx_indexcache.models.tiny_transformers`` builds the models (the CLI needs them too); this module adds
what only tests (and the examples and scripts that check against an oracle) need:

* ``index_cache_oracle(model, pattern)`` gives the IndexCache semantics without any graph pass: it
  patches each DSA layer's indexer module so that a layer marked ``S`` returns the output of the
  nearest preceding DSA layer marked ``F`` (the indexer of an ``S`` layer still runs, so its cache
  writes happen exactly as in the compiled graph, where the pass keeps them). Where a model's indexer
  post-processes its top-k (masks, pooling, ``-1`` padding) with layer-independent data, returning the
  F layer's whole output equals reusing its top-k indices, which is what the pass does;
* ``build`` / ``TINY_DSA_MODELS`` return an ``OracleModel``: a built model with ``oracle(pattern)``;
* ``PatternSwitchBackend`` traces once and runs several IndexCache configs;
* ``freq_pattern`` writes vLLM's freq/offset rule out independently of ``IndexCacheConfig``.

The package module's names are re-exported, so a test imports one module (``import hf_oracle as H``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fx_indexcache import IndexCacheConfig, IndexCachePass, detect
from fx_indexcache.graph_utils import copy_graph_module
from fx_indexcache.integrations.backend import aten_graph_backend
from fx_indexcache.models import tiny_transformers
from fx_indexcache.models.tiny_transformers import (  # noqa: F401  (re-exported for the tests)
    OTHER_SPECS,
    SPECS,
    ModelSpec,
    TinyModel,
    dynamo_config,
    indexer_modules,
    output_of,
    prefill,
    prefill_and_decode,
    spec_of,
)


@contextlib.contextmanager
def index_cache_oracle(model: nn.Module, pattern: str) -> Iterator[dict[int, int]]:
    """Run ``model`` with IndexCache semantics by patching its indexer modules (no graph pass).

    ``pattern[i]`` marks global decoder layer ``i``; an ``S`` DSA layer returns the output of the
    nearest preceding DSA layer marked ``F``; an ``S`` with no such layer computes its own (and, being
    marked S, serves no later layer). Yields ``{S layer: source layer}`` for the layers that share.
    The indexer of an S layer still runs (its cache writes stay), and its result is discarded.
    Patches are instance attributes, removed on exit.

    Layers without an indexer are skipped when looking for the source; in the tiny models every
    layer has one, so this equals "the nearest preceding layer marked F".
    """
    spec = spec_of(model)
    indexers = indexer_modules(model, spec)
    if len(pattern) < max(indexers, default=-1) + 1:
        raise ValueError(f"pattern {pattern!r} is shorter than the model's {max(indexers) + 1} layers")
    sources: dict[int, int] = {}
    last_full = None
    for layer in sorted(indexers):
        if pattern[layer] != "S":
            last_full = layer
        elif last_full is not None:
            sources[layer] = last_full
    outputs: dict[int, Any] = {}

    def patched(layer: int, original: Callable, *args, **kwargs):
        result = original(*args, **kwargs)
        if layer in sources:
            return outputs[sources[layer]]
        outputs[layer] = result
        return result

    for layer, indexer in indexers.items():
        indexer.forward = functools.partial(patched, layer, indexer.forward)
    try:
        yield dict(sources)
    finally:
        for indexer in indexers.values():
            del indexer.forward


@dataclasses.dataclass
class OracleModel(TinyModel):
    """A built tiny model that also runs the oracle: ``with tiny.oracle(pattern) as sources: ...``."""

    def oracle(self, pattern: str) -> contextlib.AbstractContextManager:
        return index_cache_oracle(self.model, pattern)

    def __iter__(self):  # ``model, make_inputs, oracle = builder()``
        return iter((self.model, self.make_inputs, self.oracle))


def build(spec: ModelSpec, seed: int = 0, num_layers: int | None = None, **config_overrides: Any) -> OracleModel:
    """``tiny_transformers.build`` with the oracle attached."""
    tiny = tiny_transformers.build(spec, seed, num_layers, **config_overrides)
    return OracleModel(**{field.name: getattr(tiny, field.name) for field in dataclasses.fields(tiny)})


TINY_DSA_MODELS: dict[str, Callable[[], OracleModel]] = {
    name: functools.partial(build, spec) for name, spec in SPECS.items()
}
TINY_OTHER_INDEXER_MODELS: dict[str, Callable[[], OracleModel]] = {
    name: functools.partial(build, spec) for name, spec in OTHER_SPECS.items()
}


class PatternSwitchBackend:
    """A ``torch.compile`` backend that traces once and runs any of several IndexCache configs.

    Each graph AOTAutograd hands over is copied once per config and rewritten by ``IndexCachePass``
    (exactly what ``indexcache_eager_backend`` does to its one graph); ``use(key)`` picks the
    variant every compiled graph runs. Dynamo and AOT trace a model once for all patterns, which
    keeps a pattern × (prefill, decode, decode) matrix affordable on CPU. ``reports[key]`` lists
    that config's report for each traced graph, ``detections`` the detection on each original graph.
    """

    def __init__(self, configs: dict[str, Any]) -> None:
        self.configs = {
            key: cfg if isinstance(cfg, IndexCacheConfig) else IndexCacheConfig(use_index_cache=True, **cfg)
            for key, cfg in configs.items()
        }
        self.current: str | None = None
        self.reports: dict[str, list] = {key: [] for key in self.configs}
        self.detections: list = []

    @contextlib.contextmanager
    def use(self, key: str) -> Iterator[None]:
        if key not in self.configs:
            raise KeyError(key)
        previous, self.current = self.current, key
        try:
            yield
        finally:
            self.current = previous

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        def with_variants(module: torch.fx.GraphModule):
            self.detections.append(detect(copy_graph_module(module).graph))
            variants = {}
            for key, config in self.configs.items():
                variant = copy_graph_module(module)
                self.reports[key].append(IndexCachePass(config).run(variant.graph, graph_name=key))
                variant.recompile()
                variants[key] = variant

            def run(*args):
                if self.current is None:
                    raise RuntimeError("PatternSwitchBackend: call inside `with backend.use(key):`")
                return variants[self.current](*args)

            return run

        return aten_graph_backend(with_variants)(gm, example_inputs)


def freq_pattern(num_layers: int, freq: int, offset: int = 2) -> str:
    """The F/S string vLLM's ``index_topk_freq`` / ``index_skip_topk_offset`` give (written out here,
    independently of ``IndexCacheConfig``, so tests compare two implementations)."""
    return "".join("F" if max(i - offset + 1, 0) % freq == 0 else "S" for i in range(num_layers))
