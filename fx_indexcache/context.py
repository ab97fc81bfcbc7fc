"""``GraphContext``: what an entry point knows about one graph before the pass sees it.

Built once per graph by the entry point (a backend call, the export helper, vLLM's pass) and handed, frozen,
to every stage: detection reads where layer identity may come from, the rewrite reads the model's layer count,
the report reads the cross-graph plan. Nothing is read back from globals, context variables or attributes set
on a pass after the fact.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import IndexCacheConfig
    from .crossgraph.plan import CrossGraphPlan


@dataclasses.dataclass(frozen=True)
class GraphContext:
    """One graph's facts from its entry point.

    ``starts_at_first_layer``: the graph begins at the model's first layer (an exported program; a dynamo graph
    of the compiled callable's own frame); None when not known. ``model_layers``: the model's decoder-layer
    count, from its config (``num_hidden_layers``), when the entry point found one. ``model``: a weak reference
    to the model the graph belongs to, which keys per-model state (cache-write choices) in the session.
    ``inference``: False for a training graph (a forward with gradients, a backward), which the pass leaves as
    it is. ``stage_first_layer``: see the field. ``cross_graph``: what the backend decided for this graph at run time, for its report. ``notes``:
    lines the entry point adds to the report (transformers' decode-only compile, say).
    """

    graph_name: str = ""
    starts_at_first_layer: bool | None = None
    model_layers: int | None = None
    model: weakref.ref | None = None
    inference: bool = True
    cross_graph: CrossGraphPlan | None = None
    notes: tuple[str, ...] = ()
    #: A pipeline stage's first global decoder layer, when its module paths count from 0 (``layers[2:]`` rebuilt
    #: as a list of its own); None: the paths are global.
    stage_first_layer: int | None = None
    #: Why some calls of the model run uncompiled beside this graph (transformers' decode-step compile, whose
    #: prefill is eager), or None. Such calls compute every layer, so no S layer's cache writes may be dropped.
    eager_calls: str | None = None
    #: Split each computing indexer's query rows across the default process group's ranks (``rewrite.shard_rows``);
    #: effective only where a group of more than one rank is initialised when the graph is rewritten.
    shard_indexer_rows: bool = False
    #: The modules the compiled frame reaches by name (its locals, the globals its code reads), keyed by root
    #: (``L.tail``, ``G.model``), held weakly: what module paths rooted there (``L['tail'][0]``) name, resolved by
    #: identity against the model (``integrations/frame_locals.py``).
    frame_modules: tuple[tuple[str, weakref.ref], ...] = ()
    #: The tensors whose identity dynamo guards for this graph (``integrations/block_guards.py``): blocks reached
    #: through a module list the compiled frame holds; the pass's ``uuid`` is then None (no FX graph cache).
    pinned_blocks: tuple[str, ...] = ()
    #: What the graph's layer numbers rest on (its module paths and layer records, ``integrations/cache_key.py``),
    #: as a digest the pass's ``uuid`` covers: the FX graph cache key covers the code, not the numbers. None: not
    #: known (a pass installed by hand), and the pass's ``uuid`` is None.
    numbering_digest: str | None = None
    #: For a compiled function (no model on the stack): the one module its frame reaches that holds the others
    #: (``run(model, x)``'s model), held weakly. Only the cache-write ledger reads it: the graph's writes go to that
    #: model's caches, so its choices bind the model's other graphs (cross-graph hooks still need ``model``).
    cache_owner: weakref.ref | None = None

    def layer_count(self, config: IndexCacheConfig) -> int | None:
        """The decoder-layer count a proof may rely on: the keys' ``num_layers``, the model's config, or the
        explicit pattern's length (one entry per decoder layer, as the engines read it)."""
        pattern = config.explicit_pattern if config.use_index_cache else None
        for count in (config.num_layers, self.model_layers, len(pattern) if pattern else None):
            if count:
                return count
        return None

    def model_object(self) -> Any:
        return None if self.model is None else self.model()

    def ledger_owner(self) -> Any:
        """Whose cache-write ledger binds this graph: its model, else the module its compiled function holds."""
        model = self.model_object()
        if model is not None or self.cache_owner is None:
            return model
        return self.cache_owner()


def layer_count_of(config: Any) -> int | None:
    """Decoder layers a model config states: ``num_hidden_layers`` (transformers, the engines), else ``num_layers``
    (the reference model), in the config or its ``text_config``; None when it states neither."""
    if config is None:
        return None
    sources = [config]
    nested = config.get("text_config") if isinstance(config, Mapping) else getattr(config, "text_config", None)
    if nested is not None:
        sources.append(nested)
    for key in ("num_hidden_layers", "num_layers"):
        for source in sources:
            value = source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def model_layer_count(model: Any) -> int | None:
    """The decoder-layer count a model's config states (``layer_count_of`` on its ``config``)."""
    return layer_count_of(getattr(model, "config", None))
