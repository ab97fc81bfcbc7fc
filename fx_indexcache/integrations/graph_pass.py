"""``IndexCachePass``: the post-grad Inductor pass that composes detection, rewrite and report."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from torch import fx, nn
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..config import IndexCacheConfig
from ..context import GraphContext
from ..detection.registry import (LayerSource, detect, finders_fingerprint, refuse_rival_lists, refuse_stage_numbering,
                                  shift_to_global)
from ..detection.layers import spelled_container
from ..detection.stage import stage_paths_are_global
from ..fuse.precision import PrecisionRecord, precision_records
from ..fuse.substitute import FusionRecord, substitute_fused_indexer
from ..graph_utils import fake_value
from ..report.graph_report import IndexCacheReport
from ..report.trace import PassTrace
from ..rewrite.regional import share_across_regions
from ..rewrite.shard_rows import RowShardRecord, ShardGroup, shard_indexer_rows
from ..rewrite.share import COMPUTED, UNMARKED, DropProof, LayerDecision, apply_index_cache
from ..session import IndexCacheSession, default_session
from .frame_locals import prove_container_numbers

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parents[1]  # the fx_indexcache package directory


@functools.lru_cache(maxsize=None)
def _package_digest(root: Path) -> str:
    """Hash of every ``.py`` file under ``root``: all the code that can shape the rewritten graph.

    The whole package rather than a list of modules, so a module added later (or one a list would
    forget, such as the vLLM pass's MTP rule or the kernel's support check) cannot be missed.
    """
    files = sorted(path for path in root.rglob("*.py") if "__pycache__" not in path.parts)
    if not files:
        raise FileNotFoundError(f"fx_indexcache: no source files under {root} to hash for the pass's uuid")
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _source_digest() -> str:
    """The package's source and every registered site finder's code."""
    return hashlib.sha256(f"{_package_digest(_PACKAGE)}|{finders_fingerprint()}".encode()).hexdigest()


def _pass_base() -> type:
    """Inductor's inference-aware pass interface where this torch has it (it hands the pass ``is_inference``)."""
    from torch._inductor import custom_graph_pass

    return getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", CustomGraphPass)


_TRAINING_NOTE = (
    "training graph (gradients flow through it): left as it is, so that a backward's recomputation "
    "(activation checkpointing) and the forward agree; compile under torch.no_grad() or "
    "torch.inference_mode() for IndexCache"
)


def container_length(model: nn.Module, container: str) -> int | None:
    """How many blocks the module list ``container`` of ``model`` holds (its path as ``layer_slot`` spells it)."""
    for name, module in model.named_modules():
        if spelled_container(name) == container and isinstance(module, (nn.ModuleList, nn.Sequential)):
            return len(module)
    return None


def rival_lists(model: nn.Module, container: str) -> list[str]:
    """Other lists of blocks in ``model`` as long as ``container`` (its path as ``layer_slot`` spells it), outside
    it and holding none of its blocks: a vision tower beside the language model, say. A graph that holds only one of
    them (a break inside the other's forward) cannot tell which one the pattern numbers. Lists of leaves (per-layer
    norms) are no rivals."""
    lists = {spelled_container(name): module for name, module in model.named_modules()
             if name and isinstance(module, (nn.ModuleList, nn.Sequential))}
    own = lists.get(container)
    if own is None:
        return []
    blocks = {id(block) for block in own}
    return [name for name, module in lists.items()
            if name != container and not name.startswith(container + ".") and not container.startswith(name + ".")
            and len(module) == len(own) and not any(id(block) in blocks for block in module)
            and all(next(block.children(), None) is not None for block in module)]


def _spans(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    spans: list[list[int]] = []
    for layer in layers:
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class IndexCachePass(_pass_base()):  # type: ignore[misc]
    """Rewrites a post-grad ATen graph in place so S layers reuse their F layer's indices.

    Use it as Inductor's ``post_grad_custom_post_pass`` (``indexcache_backend`` does that),
    or call it on any ``fx.Graph``. ``uuid()`` covers the config, this package's source, the
    registered site finders and what the graph's layer numbers rest on, so the FX graph cache never
    serves a graph rewritten under another pattern or for other layers; installed by hand (no backend
    to read the graph's module paths first) it is None and Inductor bypasses that cache. The config is
    an ``IndexCacheConfig``, a dict of keys or keyword keys; keys given switch ``use_index_cache`` on
    unless it is given too, as everywhere else.

    ``graph_starts_at_first_layer``: whether the graph begins at the model's first layer (True for a
    whole exported program; the backends tell it for each dynamo graph; None: not known). Only then
    may sites without a layer number in their module path be numbered by graph order, and only when
    the graph holds one indexer for each of the model's decoder layers (a count the keys state:
    ``num_layers`` or an explicit pattern). ``session``: the owner of the reports and per-model state
    (the default session when None). ``context``: the entry point's facts about the graph (a backend
    builds one per graph; ``graph_starts_at_first_layer`` fills it otherwise).

    ``shard_indexer_rows``: split each computing indexer's query rows across the ranks of the default process
    group and all-gather the top-k (``rewrite.shard_rows``; exact); it takes effect where a group of more than
    one rank is initialised when the graph is rewritten, and the report says per layer what each rank scored.

    A training graph (Inductor says so through ``is_inference``, or the backend's context) is left as
    it is: the report and a warning say why.
    """

    def __init__(
        self,
        config: IndexCacheConfig | dict | None = None,
        *,
        graph_starts_at_first_layer: bool | None = None,
        session: IndexCacheSession | None = None,
        context: GraphContext | None = None,
        annotate: Callable[[IndexCacheReport], list[str]] | None = None,
        stage_first_layer: int | None = None,
        shard_indexer_rows: bool | None = None,
        **keys,
    ) -> None:
        if graph_starts_at_first_layer not in (None, True, False):
            raise ValueError(
                f"IndexCachePass: graph_starts_at_first_layer={graph_starts_at_first_layer!r} is not allowed; "
                "it must be True, False or None"
            )
        if context is not None and graph_starts_at_first_layer is not None:
            raise TypeError("IndexCachePass: give graph_starts_at_first_layer or a context, not both")
        self.config = IndexCacheConfig.coerce(config, keys, "IndexCachePass")
        self.session = default_session() if session is None else session
        check_shard_rows(shard_indexer_rows, "IndexCachePass")
        if context is None:
            context = GraphContext(starts_at_first_layer=graph_starts_at_first_layer,
                                   stage_first_layer=stage_first_layer)
        elif stage_first_layer is not None:
            context = dataclasses.replace(context, stage_first_layer=stage_first_layer)
        if shard_indexer_rows is not None:
            context = dataclasses.replace(context, shard_indexer_rows=shard_indexer_rows)
        self.context = context
        self.annotate = annotate  # an entry point's own notes on a report, added before it is published
        self.reports: list[IndexCacheReport] = []

    def __getstate__(self) -> dict:
        """Picklable (Inductor pickles its config, this pass among it, for compile workers): the weak references
        (model, frame modules, cache owner) and the plan stay in this process; the copy reports into a session of
        its own."""
        state = dict(self.__dict__)
        state["context"] = dataclasses.replace(self.context, model=None, cross_graph=None, frame_modules=(),
                                               cache_owner=None)
        state["reports"] = []
        return state

    @property
    def graph_starts_at_first_layer(self) -> bool | None:
        return self.context.starts_at_first_layer

    def with_context(self, **changes) -> IndexCachePass:
        """The same pass (config, session, report list) for a graph whose context differs in ``changes``."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)  # the same config, session and report list (not a pickled copy)
        twin.context = dataclasses.replace(self.context, **changes)
        return twin

    def with_plan(self, plan) -> IndexCachePass:
        return self.with_context(cross_graph=plan)

    def for_training(self) -> IndexCachePass:
        return self.with_context(inference=False)

    def __call__(self, graph: fx.Graph, is_inference: bool | None = None) -> None:
        if is_inference is False and self.context.inference:
            self.for_training().run(graph)
        else:
            self.run(graph)

    # ------------------------------------------------------------------ stages
    def layer_count(self) -> int | None:
        return self.context.layer_count(self.config)

    def detect(self, graph: fx.Graph):
        """Detection under this graph's context (where layer identity may come from).

        Module paths of a pipeline stage rebuilt from ``layers[N:]`` count from 0: they are shifted by the stage's
        first layer when the context gives it (unless they are global already: ``detection/stage.py``), and refused
        when the model's layer count shows the layer list is shorter than the model (never read as global
        numbers)."""
        model = self.context.model_object()
        list_length = functools.partial(container_length, model) if isinstance(model, nn.Module) else None
        detection = detect(graph, self.context.starts_at_first_layer, self.layer_count(), list_length)
        if detection.layer_source is not LayerSource.MODULE_PATH:
            return detection
        prove_container_numbers(detection, self.context)  # L['tail'][0], dsa_layers.0: the model's numbers, or none
        if detection.layer_source is not LayerSource.MODULE_PATH:
            return detection
        first, count = self.context.stage_first_layer, self.layer_count()
        if first is not None:  # told where the stage starts: its paths are global, or global once shifted
            if not stage_paths_are_global(model, detection.container, first, count):
                shift_to_global(detection, first)
        elif count and detection.container and isinstance(model, nn.Module):
            blocks = container_length(model, detection.container)
            if blocks is not None and blocks < count:
                refuse_stage_numbering(detection, blocks, count)
        if first is None and detection.layer_source is LayerSource.MODULE_PATH and isinstance(model, nn.Module):
            container = detection.model_container or detection.container
            rivals = rival_lists(model, container) if container else []
            if rivals:
                refuse_rival_lists(detection, f"this graph numbers {container}; the model also holds "
                                              f"{', '.join(rivals)}, as long")
        return detection

    def model_layers(self, detection) -> int | None:
        """The model's decoder-layer count: its config's, else the length of the layer list the module paths name
        (DeepSeek's own code keeps no config count); None when neither is known."""
        if self.context.model_layers:
            return self.context.model_layers
        model = self.context.model_object()
        if not isinstance(model, nn.Module) or not detection.container:
            return None
        blocks = container_length(model, detection.container)
        return None if blocks is None else blocks + detection.stage_shift

    def ledger(self):
        return self.session.ledger(self.context.ledger_owner())

    def _ledger_state(self) -> str:
        """The ledger the decisions read: the owner's, and every model's drops where the owner is unknown."""
        scope = self.config.fingerprint()
        elsewhere = self.session.any_dropped(scope) if self._dropped_elsewhere() is not None else []
        return f"{self.ledger().state(scope)}|elsewhere={','.join(elsewhere)}"

    def _dropped_elsewhere(self):
        """Where the graph's model is unknown (a compiled function), an indexer of unknown layer is checked against
        every model's drops: a block handed alone may be any model's layer."""
        return self.session.any_dropped if self.context.model_object() is None else None

    def drop_proof(self, detection) -> DropProof:
        """Whether nothing but this graph computes its S layers, so their key-cache writes are never read, and why.

        The proof: the graph holds every decoder layer of a model whose layer count is known (its config, the keys,
        the pattern, or its layer list), so each S layer's source is in the graph, no cross-graph variant of it
        computes an S layer, and every other graph of the model is bound by the ledger (a later graph that would
        compute a dropped layer fails loudly); and no call of the model runs eagerly beside it.
        """
        if detection.unknown_reason is not None:
            return DropProof(False, "not proven: the layer index is unknown")
        if self.context.eager_calls is not None:
            return DropProof(False, f"not proven: {self.context.eager_calls}, computing every layer")
        count = self.layer_count() or self.model_layers(detection)
        if not count:
            return DropProof(False, "not proven: the model's layer count is not known")
        missing = sorted(set(range(count)) - detection.layers_present)
        if missing:
            return DropProof(False, f"not proven: the graph does not hold layer(s) {_spans(missing)} of the model's "
                                    f"{count}; another graph may compute its S layers")
        return DropProof(True, f"proven: the graph holds all {count} decoder layers of the model")

    def share_in_place(self, graph: fx.Graph):
        """Detect and share inside ``graph`` (no fusion, no report): the cross-graph variants start from this."""
        detection = self.detect(graph)
        apply_index_cache(graph, detection, self.config, self.ledger(), self.drop_proof(detection),
                          self.context.stage_first_layer, self._dropped_elsewhere())
        return detection

    def run(self, graph: fx.Graph, graph_name: str = "") -> IndexCacheReport:
        """Detect, rewrite (every layer F when ``use_index_cache`` is off), fuse F-layer scoring where enabled and on
        CUDA; returns and publishes the report."""
        context = self.context if not graph_name else dataclasses.replace(self.context, graph_name=graph_name)
        trace = PassTrace(graph, context.graph_name)
        trace.dump("before")
        with trace.stage("detect"):
            detection = self.detect(graph)
        if not context.inference:
            return self._leave_training_graph(detection, context, trace)
        self._check_pattern_length(detection)
        with trace.stage("share"):
            decisions = apply_index_cache(graph, detection, self.config, self.ledger(),  # all F when off
                                          self.drop_proof(detection), self.context.stage_first_layer,
                                          self._dropped_elsewhere())
        with trace.stage("regions"):
            regional = share_across_regions(graph.owning_module, self.config) if (
                detection.nested_regions and isinstance(graph.owning_module, fx.GraphModule)) else []
        handled = {call.region for call in regional}  # their calls are reported one by one instead
        detection.nested_regions = [n for n in detection.nested_regions if n.split(" ")[0] not in handled]
        detection.hidden = [hidden for hidden in detection.hidden if not handled.intersection(hidden.subgraphs)]
        with trace.stage("shard rows"):
            row_shards = self._shard_rows(graph, detection)
        with trace.stage("fuse"):
            kernel_records, precision = fuse_indexers(graph, detection.sites, self.config)
        trace.dump("after")
        report = IndexCacheReport.build(self.config, detection, decisions, context, fusions=kernel_records,
                                        precision=precision, regional=regional, row_shards=row_shards)
        self._warn(detection, report, context)
        self._count(report)
        trace.finish()
        return self._publish(report)

    def _shard_rows(self, graph: fx.Graph, detection) -> list[RowShardRecord]:
        """With ``shard_indexer_rows``, the computing indexers' rows split across the process group (before the
        fused kernel: a split layer keeps Inductor's scoring on its rows)."""
        if not self.context.shard_indexer_rows:
            return []
        return shard_indexer_rows(graph, detection.sites, ShardGroup.current())

    def _check_pattern_length(self, detection) -> None:
        """One error naming the model's layer count when an explicit pattern does not fit the model."""
        config = self.config
        if not config.use_index_cache or config.explicit_pattern is None:
            return
        config.check_model_layers(self.context.model_layers or config.num_layers)  # a count the model states
        # A lower bound otherwise: the layer list's length (a stage's list may be shorter than the model) and the
        # highest layer this graph holds.
        listed = self.model_layers(detection) if detection.unknown_reason is None else None
        layers = [site.layer + 1 for site in detection.sites if site.layer is not None]
        at_least = max([*layers, listed or 0])
        if config.num_layers is None and at_least > len(config.explicit_pattern):
            raise config.pattern_length_error(at_least, exact=False)

    def _leave_training_graph(self, detection, context: GraphContext, trace: PassTrace) -> IndexCacheReport:
        decisions = [LayerDecision(site.layer, UNMARKED, COMPUTED, site.layer, note=_TRAINING_NOTE)
                     for site in detection.sites]
        report = IndexCacheReport.build(self.config, detection, decisions, context)
        if detection.sites and self.config.use_index_cache:
            self.session.warn_once("training", "fx_indexcache: %s", _TRAINING_NOTE)
        counters["fx_indexcache"]["training_graphs_left"] += 1
        trace.finish()
        return self._publish(report)

    def _warn(self, detection, report: IndexCacheReport, context: GraphContext) -> None:
        plan = context.cross_graph
        cross_graph_active = plan is not None and plan.active and not plan.numbered
        name = context.graph_name or "compiled graph"
        if detection.unknown_reason is not None and self.config.use_index_cache and not cross_graph_active:
            log.warning(
                "fx_indexcache: %s: the layer index of its %d indexer(s) is unknown (%s); every layer in it computes, "
                "the configured pattern is not applied there", name, len(report.decisions), detection.unknown_text,
            )
        if not detection.sites and detection.unplaced and self.config.use_index_cache:
            log.warning(
                "fx_indexcache: %s: its %d indexer(s) are all left as they are; the first: %s",
                name, len(detection.unplaced), detection.unplaced[0][1],
            )
        elif not detection.sites and self.config.use_index_cache and context.starts_at_first_layer:
            self.session.warn_once(
                "no-sites", "fx_indexcache: %s holds no DSA lightning indexer, so IndexCache changes nothing there. "
                "The detector looks for a top-k over the key axis of sum_h w[t,h]*ReLU(q[t,h].k[s]) with q and k "
                "computed from activations (%d other top-k were left alone: routers, samplers). If the indexers sit "
                "in a later graph (after a graph break), that graph's report lists them.", name, report.router_topk)

    @staticmethod
    def _count(report: IndexCacheReport) -> None:
        stats = counters["fx_indexcache"]
        stats["indexers_fused"] += report.indexers_fused
        stats["graphs"] += 1
        stats["indexer_sites"] += len(report.decisions)
        stats["indexers_removed"] += report.indexers_removed
        stats["layers_left"] += len(report.layers_left)
        stats["other_topk"] += report.router_topk

    def _publish(self, report: IndexCacheReport) -> IndexCacheReport:
        if self.annotate is not None:
            report = dataclasses.replace(report, other_notes=[*report.other_notes, *self.annotate(report)])
        self.reports.append(report)
        self.session.publish(report)
        return report

    def _shard_key(self) -> str:
        """Each rank's graph scores its own rows: the FX graph cache must never serve one rank another's."""
        if not self.context.shard_indexer_rows:
            return "off"
        group = ShardGroup.current()
        return group.key() if isinstance(group, ShardGroup) else "no group"

    def uuid(self) -> str | None:
        """The key of the rewrite: config, source, what the layer numbers rest on, and the model's cache-write
        ledger as it stands (the decisions depend on what earlier graphs chose; a graph served from a cache then
        replays its entry's choices: ``integrations/ledger_effects.py``).

        None (Inductor then bypasses its FX graph cache) where no key can cover what the graph's layer numbers
        rest on: a pass installed by hand, which does not see the graph's module paths before it, and a graph whose
        numbers rest on which blocks a compiled function was handed (``context.pinned_blocks``)."""
        if self.context.numbering_digest is None or self.context.pinned_blocks:
            return None
        state = (f"{self.config.fingerprint()}|starts={self.context.starts_at_first_layer}|"
                 f"layers={self.context.model_layers}|stage={self.context.stage_first_layer}|"
                 f"eager_calls={self.context.eager_calls is not None}|"
                 f"inference={self.context.inference}|shard={self._shard_key()}|"
                 f"numbering={self.context.numbering_digest}|"
                 f"ledger={self._ledger_state()}|{_source_digest()}")
        return hashlib.sha256(state.encode()).hexdigest()


def check_shard_rows(value, where: str) -> None:
    """``shard_indexer_rows`` must be a bool (None: not given)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{where}: shard_indexer_rows={value!r} is not allowed; it must be True or False (split each "
                         "computing indexer's query rows across the ranks of the default process group)")


def fuse_indexers(graph: fx.Graph, sites, config: IndexCacheConfig) -> tuple[list[FusionRecord], list[PrecisionRecord]]:
    """Swap the F layers' scoring for the fused kernel, only where some site lives on CUDA; with
    ``indexer_precision`` other than bf16, also say per F layer whether that precision runs.

    With IndexCache off the graph stays exactly as it is unless the kernel was asked for
    explicitly (``fuse_indexer_kernel=True``).
    """
    def is_cuda(site) -> bool:
        return getattr(fake_value(site.indices), "is_cuda", False)

    live = [s for s in sites if not getattr(s.anchor, "_erased", False) and s.anchor.graph is graph]
    on_cuda = [s for s in live if is_cuda(s)]
    precision = config.indexer_precision
    records = (substitute_fused_indexer(graph, on_cuda, precision, score_and_topk=config.fuse_score_and_topk)
               if config.fuses_kernel and on_cuda else [])
    rows = precision_records(precision, live, records, fusion_enabled=config.fuses_kernel, on_cuda=is_cuda)
    missed = [r for r in rows if r.reason is not None]
    if missed:
        log.warning(
            "fx_indexcache: %s: indexer_precision=%r not applied at %d of %d F-layer indexers (%s); they score "
            "exactly in bf16/fp32", graph.owning_module.__class__.__name__ if graph.owning_module else "graph",
            precision, len(missed), len(rows), "; ".join(sorted({r.reason.value for r in missed})),
        )
    return records, rows


class FusionOnlyPass(CustomGraphPass):
    """The pass's kernel fusion alone, for graphs the IndexCache rewrite has already shared: the cross-graph
    variants (``crossgraph.build``), which the wrapper runs instead of the as-is graph when its run-time check
    passes. Without it their F layers would run Inductor's unfused scoring while the as-is graph's report says
    they are fused."""

    def __init__(self, config: IndexCacheConfig) -> None:
        self.config = config

    def __call__(self, graph: fx.Graph) -> None:
        records, _ = fuse_indexers(graph, detect(graph).sites, self.config)
        counters["fx_indexcache"]["variant_indexers_fused"] += sum(r.fused for r in records)

    def uuid(self) -> str:
        return hashlib.sha256(f"fusion only|{self.config.fingerprint()}|{_source_digest()}".encode()).hexdigest()
