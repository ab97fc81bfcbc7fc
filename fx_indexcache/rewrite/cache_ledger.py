"""One decision per layer about its indexer key-cache writes, across all graphs of a model.

An S layer's key-cache writes can be dropped because nothing reads them once it shares. But a
model compiles to several graphs (compile ranges, recompiles, prefill and decode); if one graph
drops layer L's writes and another leaves L computing, the computing one reads cache rows nobody
wrote. So the first graph's choice for a layer binds the later ones: a layer whose writes were
kept keeps them (it may still share, with its writes in place, where the writes are separate
nodes), and a layer whose writes were dropped must share again, or the compile fails loudly.
"""

from __future__ import annotations

import enum
import threading


class WriteChoice(str, enum.Enum):
    KEPT = "kept"
    DROPPED = "dropped"


class CacheWriteConflict(RuntimeError):
    """A graph would compute a layer whose cache writes an earlier graph of the model dropped."""


class CacheWriteLedger:
    """One model's write choice per (scope, layer key); the scope keeps two configs apart. A session keeps one
    ledger per model (``IndexCacheSession.ledger``), so two models never see each other's choices."""

    def __init__(self) -> None:
        self._choices: dict[tuple[str, str], WriteChoice] = {}
        self._lock = threading.Lock()

    def earlier(self, scope: str, key: str) -> WriteChoice | None:
        with self._lock:
            return self._choices.get((scope, key))

    def any_dropped(self, scope: str) -> list[str]:
        with self._lock:
            return [key for (s, key), choice in self._choices.items() if s == scope and choice is WriteChoice.DROPPED]

    def record(self, scope: str, key: str, choice: WriteChoice) -> None:
        with self._lock:
            self._choices.setdefault((scope, key), choice)

    def state(self, scope: str) -> str:
        """The choices under ``scope`` as text (the pass's ``uuid`` covers it: decisions depend on it)."""
        with self._lock:
            return ";".join(sorted(f"{key}={choice.value}" for (s, key), choice in self._choices.items() if s == scope))

    def entries(self) -> list[tuple[str, str, str]]:
        """Every choice as ``(scope, layer key, choice)``, in the order they were made."""
        with self._lock:
            return [(scope, key, choice.value) for (scope, key), choice in self._choices.items()]

    def replay(self, entries: list[tuple[str, str, str]]) -> None:
        """Make the choices ``entries`` lists, as a compile served from a cache would have made them."""
        for scope, key, choice in entries:
            self.record(scope, key, WriteChoice(choice))

    def restore(self, entries: list[tuple[str, str, str]]) -> None:
        """Back to the choices ``entries`` (an earlier ``entries()``) lists."""
        with self._lock:
            self._choices = {(scope, key): WriteChoice(choice) for scope, key, choice in entries}

    def clear(self) -> None:
        with self._lock:
            self._choices.clear()

