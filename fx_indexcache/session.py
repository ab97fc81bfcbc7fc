"""``IndexCacheSession``: the one owner of everything that outlives a single graph.

A model compiles to several graphs (graph breaks, prefill and decode, recompiles), and some decisions must
hold across them: the report of each graph, one key-cache-write choice per layer (``cache_ledger``), the
model's layer map and the cross-graph timeline its layer graphs share at run time. All of that lives here,
per model where it is about a model, and a session is owned by the entry point that made it: a backend
object, a vLLM pass, one export call. Two models never share per-model state, whichever session they meet.

``default_session()`` serves the entry points that have no object of their own (the backend functions, a
bare ``IndexCachePass``); ``fx_indexcache.reports()`` is a view of it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from .rewrite.cache_ledger import CacheWriteLedger

from torch import nn

if TYPE_CHECKING:
    from .crossgraph.runtime import LayerCall, LayerMap
    from .report.graph_report import IndexCacheReport

log = logging.getLogger(__name__)

_MAX_KEPT = 256


class IndexCacheSession:
    """Reports, per-model cache-write ledgers and layer maps, and one-time warnings, for one entry point."""

    def __init__(self, name: str = "") -> None:
        self._start(name)

    def _start(self, name: str) -> None:
        self.name = name
        self._lock = threading.RLock()
        self._reports: list[IndexCacheReport] = []
        self._last_logged: tuple[str, str] | None = None  # (graph name, table) of the last report logged
        self._ledgers: weakref.WeakKeyDictionary[Any, CacheWriteLedger] = weakref.WeakKeyDictionary()
        self._unowned_ledger = CacheWriteLedger()  # graphs whose model is unknown (a bare pass on a graph)
        self._maps: weakref.WeakKeyDictionary[nn.Module, LayerMap] = weakref.WeakKeyDictionary()
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"IndexCacheSession({self.name!r}, {len(self._reports)} reports)"

    def __getstate__(self) -> dict:
        """A session is this process's state: a copy (Inductor pickles its config for compile workers) starts
        empty under the same name."""
        return {"name": self.name}

    def __setstate__(self, state: dict) -> None:
        self._start(state["name"])

    # ------------------------------------------------------------------ reports
    def publish(self, report: IndexCacheReport) -> None:
        """Keep the report and log it: the whole table, or one line when it repeats the last one logged.

        vLLM compiles one graph per compile range (and Inductor may compile a graph again): a table equal to
        the one just logged, whatever the graph's name, is logged as a line naming the graph it repeats.
        """
        from .report.trace import trace_report

        table = dataclasses.replace(report, graph_name="").format()
        with self._lock:
            self._reports.append(report)
            del self._reports[:-_MAX_KEPT]
            previous, self._last_logged = self._last_logged, (report.graph_name, table)
        if previous is not None and previous[1] == table:
            log.info("IndexCache report%s: the same as for %s (%d of %d indexers removed)",
                     f" for {report.graph_name}" if report.graph_name else "", previous[0] or "the previous graph",
                     report.indexers_removed, len(report.decisions))
        else:
            log.info("%s", report.format())
        trace_report(report)

    def reports(self) -> list[IndexCacheReport]:
        """The reports of the graphs compiled through this session, oldest first."""
        with self._lock:
            return list(self._reports)

    def clear_reports(self) -> None:
        with self._lock:
            self._reports.clear()
            self._last_logged = None

    # ------------------------------------------------------------------ per model
    def ledger(self, model: Any) -> CacheWriteLedger:
        """The cache-write choices of the graphs that may run on ``model``'s caches.

        Keyed by the model's class for a module: dynamo serves one compiled graph to every instance of a class
        whose code and guards match, so two instances may run each other's graphs (a write one dropped is
        dropped for both), while a model of another class never meets them. An exported program is its own
        key; None (a bare pass on a graph) shares one ledger in this session."""
        if model is None:
            return self._unowned_ledger
        key = type(model) if isinstance(model, nn.Module) else model
        with self._lock:
            found = self._ledgers.get(key)
            if found is None:
                found = self._ledgers[key] = CacheWriteLedger()
            return found

    def any_dropped(self, scope: str) -> list[str]:
        """The layers whose key-cache writes a graph of any model of this session dropped under ``scope``: what an
        indexer of unknown layer and unknown model might be."""
        with self._lock:
            ledgers = [*self._ledgers.values(), self._unowned_ledger]
        return sorted({key for ledger in ledgers for key in ledger.any_dropped(scope)})

    def layer_map(self, root: nn.Module) -> LayerMap:
        """``root``'s parameters by storage and its cross-graph timelines, built once (re-indexed when they moved)."""
        from .crossgraph.runtime import LayerMap

        with self._lock:
            found = self._maps.get(root)
            if found is None:
                found = self._maps[root] = LayerMap(root)
            else:
                found.refresh(root)
            return found

    def layer_calls(self, model: nn.Module) -> list[LayerCall]:
        """Per layer, what ``model``'s latest forward call in this thread did through cross-graph layer graphs."""
        model = getattr(model, "_orig_mod", model)
        with self._lock:
            found = self._maps.get(model)
        return [] if found is None else found.calls()

    # ------------------------------------------------------------------ messages
    def warn_once(self, key: str, message: str, *args: Any) -> None:
        """Log ``message`` at WARNING the first time ``key`` is seen in this session."""
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(message, *args)

    def clear(self) -> None:
        """Forget everything (tests; after ``torch._dynamo.reset()``)."""
        with self._lock:
            self.clear_reports()
            self._ledgers.clear()
            self._unowned_ledger.clear()
            self._maps.clear()
            self._warned.clear()


_DEFAULT = IndexCacheSession("default")


def default_session() -> IndexCacheSession:
    """The session of the entry points without an object of their own; ``fx_indexcache.reports()`` reads it."""
    return _DEFAULT


def reports() -> list[IndexCacheReport]:
    """Reports of the graphs compiled through the default session (the backend functions, bare passes, export)."""
    return _DEFAULT.reports()


def clear_reports() -> None:
    _DEFAULT.clear_reports()


def layer_calls(model: nn.Module, owner: Any = None) -> list[LayerCall]:
    """Per layer, what ``model``'s latest forward call in this thread did through cross-graph layer graphs.

    ``owner``: the backend object (or session) that compiled it; the default session (the backend functions)
    when None."""
    session = _DEFAULT if owner is None else getattr(owner, "session", owner)
    return session.layer_calls(model)
