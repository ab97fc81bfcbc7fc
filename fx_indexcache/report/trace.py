"""What the pass did, at DEBUG: the time each stage took and the graph before and after.

Two outlets, both free when off: the module logger at DEBUG
(``logging.getLogger("fx_indexcache").setLevel(logging.DEBUG)``) and torch's structured trace
(``TORCH_TRACE=<dir>``; ``tlparse`` lists the ``fx_indexcache_*`` artifacts next to Inductor's own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator

from torch import fx
from torch._logging import trace_structured

log = logging.getLogger(__name__)


def _artifact(name: str, payload_fn) -> None:
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"},
                     payload_fn=payload_fn, expect_trace_id=False)


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


def trace_report(report) -> None:
    """The per-layer report as a structured-trace artifact (``fx_indexcache_report``), beside the graph dumps."""
    _artifact("fx_indexcache_report", report.format)
