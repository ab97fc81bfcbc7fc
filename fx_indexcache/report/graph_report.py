"""The per-graph report: one row per DSA layer, the totals, and where a user can read it.

Reports are kept in memory (``reports()``, newest last) and logged through the
``fx_indexcache`` logger, so both a script and ``TORCH_LOGS``-style log capture see them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING

from ..config import IndexCacheConfig, PatternSource
from ..detection.registry import Detection, LayerSource, UnknownLayerIndex
from ..rewrite.share import LEFT, SHARED, LayerDecision
from .trace import trace_report

if TYPE_CHECKING:
    from ..rewrite.cross_graph_build import CrossGraphPlan
    from ..fuse.precision import PrecisionRecord
    from ..fuse.substitute import FusionRecord
    from ..rewrite.regional import RegionCall

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_REPORTS: list[IndexCacheReport] = []
_MAX_KEPT = 256
_LAST_LOGGED: list[tuple[str, str] | None] = [None]  # (graph name, table) of the last report logged


@dataclasses.dataclass
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
            f"{len(self.decisions)} DSA layers ({index}), {self.router_topk} other top-k left alone; "
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
    def build(cls, config, detection: Detection, decisions, graph_name: str = "") -> IndexCacheReport:
        notes = [f"left alone, not rewritten: {site.kind} site at {site.module_path}: {why}"
                 for site, why in detection.unplaced]
        notes += [f"indexer inside a subgraph {name} (a nested_compile_region body or a higher-order-op "
                  "block such as export's set_grad_enabled wrapper): left alone; export under "
                  "torch.no_grad() or compile whole layers to let the pass see it"
                  for name in detection.nested_regions]
        ambiguous = [v for v in detection.ignored if v.evidence]
        notes += [f"top-k {v.node.name} not rewritten: {v.reason}" for v in ambiguous]
        earlier = tuple(sorted(layer for record in detection.records.values() for layer in record.serves))
        if earlier:
            notes.append(f"layers {', '.join(map(str, earlier))} already share: removed by an earlier rewrite of this graph")
        return cls(config, decisions, detection.layer_source, len(detection.ignored), notes, graph_name,
                   detection.unknown_reason, earlier)


def publish(report: IndexCacheReport) -> None:
    """Keep the report for ``reports()`` and log it: the whole table, or one line when it repeats the last one.

    vLLM compiles one graph per compile range (and Inductor may compile a graph again): a table equal
    to the one just logged, whatever the graph's name, is logged as a line naming the graph it repeats.
    """
    table = dataclasses.replace(report, graph_name="").format()
    with _LOCK:
        _REPORTS.append(report)
        del _REPORTS[:-_MAX_KEPT]
        previous = _LAST_LOGGED[0]
        _LAST_LOGGED[0] = (report.graph_name, table)
    if previous is not None and previous[1] == table:
        log.info("IndexCache report%s: the same as for %s (%d of %d indexers removed)",
                 f" for {report.graph_name}" if report.graph_name else "", previous[0] or "the previous graph",
                 report.indexers_removed, len(report.decisions))
    else:
        log.info("%s", report.format())
    trace_report(report)  # the structured trace (TORCH_TRACE) gets every graph's report, repeated or not


def reports() -> list[IndexCacheReport]:
    """Reports of the graphs rewritten in this process, oldest first."""
    with _LOCK:
        return list(_REPORTS)


def clear_reports() -> None:
    with _LOCK:
        _REPORTS.clear()
        _LAST_LOGGED[0] = None
