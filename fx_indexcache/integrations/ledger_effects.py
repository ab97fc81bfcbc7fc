"""What a compile did to the model's cache-write ledger, kept beside Inductor's caches so that a graph they serve
leaves the ledger as the compile would have.

The ledger (``rewrite/cache_ledger.py``) binds a model's graphs to one key-cache-write choice per layer: a graph
that computes a layer whose writes an earlier graph dropped fails loudly instead of reading rows nobody wrote.
Inductor's FX graph cache and AOTAutograd's cache serve a graph without running post-grad passes, so a served
graph would record nothing, and a later graph computing one of its dropped layers would pass unseen.

The rule: a served graph replays the choices its entry's compile made. The pass's ``uuid`` covers the ledger as
it stood, so a served entry was made from the same ledger and its choices are the ones a compile would make now.
The choices are stored under a key of that uuid, the dynamo graph's code and its inputs' metadata (what the
entry's own key rests on). A served graph whose choices are not stored (the store was cleared) is compiled again
under a pass with no uuid, which both caches step aside for, so the pass runs: slower, never silently wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

Entries = list[tuple[str, str, str]]  # (scope, layer key, choice), as CacheWriteLedger.entries() gives them


def effects_key(uuid: str, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], compile_options: str) -> str:
    """The key one compile's choices are stored under: the pass's uuid, the graph's code, its inputs' metadata,
    whether gradients are on (AOTAutograd picks an inference or a training graph by it) and the compile's
    options."""
    digest = hashlib.sha256()
    for part in (uuid, gm.code, _inputs_text(example_inputs), str(torch.is_grad_enabled()),
                 str(torch.is_inference_mode_enabled()), compile_options):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _inputs_text(example_inputs: Sequence[Any]) -> str:
    parts = []
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            parts.append(f"T{tuple(value.shape)}{tuple(value.stride())}{value.dtype}{value.device.type}"
                         f"{value.requires_grad}")
        elif isinstance(value, (int, float, bool, str, torch.SymInt, torch.SymFloat, torch.SymBool)) or value is None:
            parts.append(repr(value))
        else:
            parts.append(type(value).__qualname__)
    return "|".join(parts)


class LedgerEffectsStore:
    """One file per compile key under ``root`` (Inductor's cache directory when None, read at each call, so
    ``TORCHINDUCTOR_CACHE_DIR`` moves both together)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root

    def folder(self) -> Path:
        if self.root is not None:
            return self.root
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return Path(cache_dir()) / "fx_indexcache" / "ledger_effects"

    def save(self, key: str, entries: Entries) -> None:
        """Store ``entries`` atomically (two processes compiling one graph write the same content). A folder that
        cannot be written costs only speed: a graph served later finds nothing and is compiled again."""
        try:
            folder = self.folder()
            folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{key[:16]}")
            with os.fdopen(handle, "w") as file:
                json.dump([list(entry) for entry in entries], file)
            os.replace(temporary, folder / f"{key}.json")
        except OSError as error:
            log.debug("fx_indexcache: cache-write choices not stored (%s)", error)

    def load(self, key: str) -> Entries | None:
        """The stored entries, or None where none are stored (or the file cannot be read)."""
        try:
            raw = json.loads((self.folder() / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(raw, list) or not all(isinstance(e, list) and len(e) == 3 for e in raw):
            return None
        return [(str(scope), str(layer), str(choice)) for scope, layer, choice in raw]


def new_entries(before: Entries, after: Entries) -> Entries:
    """The entries of ``after`` that ``before`` lacks, in order (the ledger only ever adds)."""
    known = set(before)
    return [entry for entry in after if entry not in known]

