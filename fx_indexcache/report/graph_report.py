"""The per-graph report: one row per DSA layer, the totals, and what the entry point decided around the graph.

A report is a frozen record made in one place (``IndexCacheReport.build``) from the stages' own results.
Its session keeps it (``IndexCacheSession.reports()``; ``fx_indexcache.reports()`` for the default session),
logs it through the ``fx_indexcache`` logger and writes it to torch's structured trace.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..config import IndexCacheConfig, PatternSource
from ..detection.registry import Detection, LayerSource, UnknownLayerIndex
from ..rewrite.share import CUT_NOTE, LEFT, SHARED, LayerDecision

if TYPE_CHECKING:
    from ..context import GraphContext
    from ..crossgraph.plan import CrossGraphPlan
    from ..fuse.precision import PrecisionRecord
    from ..fuse.substitute import FusionRecord
    from ..rewrite.regional import RegionCall
    from ..rewrite.shard_rows import RowShardRecord


@dataclasses.dataclass(frozen=True)
class IndexCacheReport:
    """What the pass found and did in one compiled graph."""

    config: IndexCacheConfig
    decisions: list[LayerDecision]
    layer_source: LayerSource
    router_topk: int  # top-k the detector recognised as not-an-indexer and left alone
    other_notes: list[str] = dataclasses.field(default_factory=list)
    graph_name: str = ""
    layer_index_unknown: UnknownLayerIndex | None = None  # why, when no layer could be numbered
    shared_earlier: tuple[int, ...] = ()  # S layers an earlier rewrite of this graph already removed
    fusions: list[FusionRecord] = dataclasses.field(default_factory=list)  # the fused-kernel substitution, per site
    cross_graph: CrossGraphPlan | None = None  # a graph that runs as several layers: what is decided per call
    regional: list[RegionCall] = dataclasses.field(default_factory=list)  # nested_compile_region calls rewired
    precision: list[PrecisionRecord] = dataclasses.field(default_factory=list)  # per F site, when not bf16
    #: per computing site under ``shard_indexer_rows``: the query rows this rank scored, or why it ran whole
    row_shards: list[RowShardRecord] = dataclasses.field(default_factory=list)
    #: products in top-k scores that Inductor had padded for alignment, restored before the graph was read
    padded_products_restored: int = 0
    #: indexers found but left as they are with no row of their own (two in a layer, a run repeated, another layer
    #: list's); each has a "left alone" line
    indexers_left_alone: int = 0

    @property
    def pattern_source(self) -> PatternSource:
        """Which key decided the pattern (SGLang's precedence), or that IndexCache was off."""
        return self.config.pattern_source

    @property
    def indexers_removed(self) -> int:
        return sum(d.action == SHARED for d in self.decisions)

    @property
    def indexers_fused(self) -> int:
        """F-layer sites whose scoring now runs as the fused kernel."""
        return sum(r.fused for r in self.fusions)

    @property
    def layers_left(self) -> list[LayerDecision]:
        return [d for d in self.decisions if d.action == LEFT]

    @property
    def computed_for_cut(self) -> list[int]:
        """Layers of a pipeline stage that compute only because their F layer is in an earlier stage."""
        return [d.layer for d in self.decisions if d.layer is not None and d.note.startswith(CUT_NOTE)]

    @property
    def flops_saved_per_token(self) -> float:
        return sum(d.flops_removed_per_token for d in self.decisions)

    @property
    def cache_bytes_saved(self) -> int:
        return sum(d.cache_bytes_saved for d in self.decisions)

    @property
    def pattern(self) -> str:
        """The F/S string as executed: S only where the indexer was actually removed."""
        return "".join("S" if d.action == SHARED else "F" for d in self.decisions)

    def format(self) -> str:
        index = f"layer index unknown: {self.layer_index_unknown.value}" if self.layer_index_unknown else (
            f"layer index from {self.layer_source.value}")
        lines = [
            f"IndexCache report{' for ' + self.graph_name if self.graph_name else ''}: "
            f"{len(self.decisions)} DSA layers ({index}), "
            + (f"{self.indexers_left_alone} more indexer(s) left as they are, " if self.indexers_left_alone else "")
            + f"{self.router_topk} other top-k left alone; "
            f"pattern from {self.pattern_source.value} ({self.config.switch.value})",
            f"{'layer':>5}  {'F/S':>3}  {'indices from layer':>18}  {'FX nodes removed':>16}  note",
        ]
        for d in self.decisions:
            layer = "?" if d.layer is None else d.layer
            lines.append(f"{layer:>5}  {d.marked:>3}  {d.source_layer!s:>18}  {d.nodes_removed:>16}  {d.note}")
        lines.append(
            f"indexers removed: {self.indexers_removed} of {len(self.decisions)}; "
            f"~{self.flops_saved_per_token:,.0f} FLOPs saved per query token at the traced length"
        )
        if self.cache_bytes_saved:
            lines.append(f"indexer key-cache writes dropped: {self.cache_bytes_saved:,} bytes per call")
        lines.extend(r.note() for r in self.fusions)
        lines.extend(r.note() for r in self.precision if r.reason is not None)  # applied: the fusion line says fp8
        lines.extend(r.note() for r in self.row_shards)
        lines.extend(self.other_notes)
        if self.cross_graph is not None:
            lines.append(self.cross_graph.note())
        for call in self.regional:
            source = f" from layer {call.source_layer}" if call.source_layer is not None else ""
            note = f" ({call.note})" if call.note else ""
            lines.append(f"region call, layer {call.layer} ({call.marked}): {call.action.name.lower()}{source}, "
                         f"body {call.body}{note}")
        return "\n".join(lines)

    @classmethod
    def build(cls, config: IndexCacheConfig, detection: Detection, decisions: list[LayerDecision],
              context: GraphContext, *, fusions=(), precision=(), regional=(), notes=(), row_shards=()
              ) -> IndexCacheReport:
        """The report of one run of the pass: the detection, the per-layer decisions, the fusion, precision and
        row-sharding records, the ``nested_compile_region`` calls, and what the entry point decided (``context``)."""
        lines = [f"left alone, not rewritten: {site.kind} site at {site.module_path}: {why}"
                 for site, why in detection.unplaced]
        lines += [_hidden_line(hidden) for hidden in detection.hidden]
        if detection.padded_products_restored:
            lines.append(f"{detection.padded_products_restored} product(s) in top-k scores that Inductor had padded "
                         "for alignment (pad_mm) were restored to the plain product before the graph was read")
        ambiguous = [v for v in detection.ignored if v.evidence]
        lines += [f"top-k {v.node.name} not rewritten: {v.reason}" for v in ambiguous]
        earlier = tuple(sorted(layer for record in detection.records.values() for layer in record.serves))
        if earlier:
            lines.append(f"layers {', '.join(map(str, earlier))} already share: removed by an earlier rewrite of this graph")
        lines += [f"the model already shares: layers {', '.join(map(str, site.readers))} read layer {site.layer}'s "
                  "indices (its own code, not this pass)" for site in detection.sites if len(site.readers) > 1]
        if detection.unknown_detail:
            lines.append(f"layer index unknown: {detection.unknown_text}")
        lines += [*notes, *context.notes]
        if context.stage_first_layer is not None:
            lines.append(_stage_line(context.stage_first_layer, decisions))
        plan = context.cross_graph
        if plan is not None and plan.active:
            decisions = [_with_cross_graph_note(d, plan) for d in decisions]
        return cls(config, list(decisions), detection.layer_source, len(detection.ignored), lines, context.graph_name,
                   detection.unknown_reason, earlier, list(fusions), plan, list(regional), list(precision),
                   list(row_shards), detection.padded_products_restored, len(detection.unplaced))


def _stage_line(first: int, decisions: list[LayerDecision]) -> str:
    """What the pipeline cut before layer ``first`` costs this stage: the layers that compute because of it."""
    cut = [str(d.layer) for d in decisions if d.layer is not None and d.note.startswith(CUT_NOTE)]
    served = [f"{d.layer}<-{d.source_layer}" for d in decisions if d.action == SHARED and d.source_layer is not None
              and d.source_layer >= first and (d.layer is not None and str(d.source_layer) in cut)]
    if not cut:
        return f"pipeline stage from layer {first}: no layer computes because of the cut"
    return (f"pipeline stage from layer {first}: layer(s) {', '.join(cut)} compute because of the cut (their F "
            f"layers are in an earlier stage)" + (f"; in-stage reads {', '.join(served)}" if served else ""))


def _with_cross_graph_note(decision: LayerDecision, plan: CrossGraphPlan) -> LayerDecision:
    """A decision's note with what the cross-graph wrapper does for that layer at run time."""
    if not plan.numbered:
        return dataclasses.replace(decision, note="layer index unknown at compile time: found per call "
                                                  "(see the cross-graph line)")
    if decision.layer in plan.reads:
        return dataclasses.replace(decision, note=decision.note + "; reads the indices of the last F layer that "
                                   "ran before it, from an earlier graph, when the run-time check passes")
    return decision


def _hidden_line(hidden) -> str:
    """One report line for a selection the detector cannot read (``detection/hidden.py``)."""
    where = f"layer {hidden.layer}" if hidden.layer is not None else f"node {hidden.node.name} (its layer unknown)"
    line = (f"{where} holds {hidden.what}: left alone; the pass cannot read it, so no layer takes its indices and it "
            "is not skipped as a layer without an indexer")
    return f"{line}; what lets the pass read it: {hidden.remedy}" if hidden.remedy else line

