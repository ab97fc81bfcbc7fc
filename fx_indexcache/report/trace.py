"""What the pass did, for torch's own observability tools: stage timings, the graph before and after, the report.

Two outlets, both free when off:

- the module loggers, children of ``fx_indexcache``: ``TORCH_LOGS=fx_indexcache`` (or ``+fx_indexcache`` for
  DEBUG) turns them on the way torch's own components are, as does
  ``logging.getLogger("fx_indexcache").setLevel(...)``; INFO is the per-graph report, DEBUG adds the stage
  timings and the graph's code before and after;
- torch's structured trace (``TORCH_TRACE=<dir>``, read with ``tlparse``), whatever the log level: the
  artifacts ``fx_indexcache_report`` (each graph's report, JSON), ``fx_indexcache_timings`` and
  ``fx_indexcache_graph_before`` / ``_after``, next to Inductor's own artifacts of the same compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import fx
from torch._logging import trace_structured

if TYPE_CHECKING:
    from .graph_report import IndexCacheReport

log = logging.getLogger(__name__)

REPORT_ARTIFACT = "fx_indexcache_report"


def _artifact(name: str, payload_fn, encoding: str = "string") -> None:
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding},
                     payload_fn=payload_fn, expect_trace_id=False)


def report_record(report: IndexCacheReport) -> dict:
    """The report as plain data: one record per layer (every field of its decision) and the table as printed."""
    return {
        "graph": report.graph_name,
        "pattern": report.pattern,
        "pattern_source": str(report.pattern_source.value),
        "layer_source": str(report.layer_source.value),
        "indexers_removed": report.indexers_removed,
        "indexers_fused": report.indexers_fused,
        "router_topk": report.router_topk,
        "padded_products_restored": report.padded_products_restored,
        "indexers_left_alone": report.indexers_left_alone,
        "layers": [dataclasses.asdict(decision) for decision in report.decisions],
        "table": report.format(),
    }


def trace_report(report: IndexCacheReport) -> None:
    """Write ``report`` to torch's structured trace as the ``fx_indexcache_report`` artifact (JSON).

    ``tlparse`` then shows each compiled graph's per-layer table beside Inductor's output code for the same
    compile, which is where a user reading a trace looks for why a graph came out as it did.
    """
    _artifact(REPORT_ARTIFACT, lambda: json.dumps(report_record(report), default=str), encoding="json")


def _code(graph: fx.Graph) -> str:
    return graph.python_code(root_module="self").src


class PassTrace:
    """One run of the pass over one graph: ``stage(name)`` times a stage, ``dump(when)`` shows the graph."""

    def __init__(self, graph: fx.Graph, graph_name: str) -> None:
        self.graph, self.name = graph, graph_name or "compiled graph"
        self.timings_ms: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings_ms[name] = (time.perf_counter() - start) * 1e3

    def dump(self, when: str) -> None:
        """The graph's code ``when`` ("before" / "after") the pass."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s IndexCache (%d nodes):\n%s", self.name, when, len(self.graph.nodes), _code(self.graph))
        _artifact(f"fx_indexcache_graph_{when}", lambda: _code(self.graph))

    def finish(self) -> None:
        """Log the stage timings (and the whole pass's)."""
        total = (time.perf_counter() - self._start) * 1e3
        stages = ", ".join(f"{name} {ms:.2f} ms" for name, ms in self.timings_ms.items())
        log.debug("%s: IndexCache pass %.2f ms (%s)", self.name, total, stages)
        _artifact("fx_indexcache_timings", lambda: json.dumps({"graph": self.name, "total_ms": total, **self.timings_ms}))

