"""Byte-level text that exists on every machine without a download: the running Python's standard library.

The shipped checkpoint (``reference.checkpoint``) was trained on it, and the pattern tools calibrate on it.
Three splits, fixed by name so that any machine draws the same ones:

* ``CALIBRATION_FILES`` -- what ``search`` scores patterns on (and ``overlap`` records on);
* ``HELD_OUT_FILES``    -- what the quality table is measured on; never trained on, never searched on;
* training              -- every other ``.py`` file of the standard library (tests and site-packages left out).

The named files were picked among those whose content is byte-identical in CPython 3.11.7 and 3.12.1;
``DIGESTS`` holds their SHA-256 (first 16 hex digits) so a machine whose copy differs is told so
(``check_digests``). The training split follows the rule above and so varies a little between versions.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

CALIBRATION_FILES = ("bdb.py", "cmd.py", "fileinput.py", "queue.py", "selectors.py", "shelve.py", "string.py", "trace.py")
HELD_OUT_FILES = (
    "difflib.py", "gettext.py", "graphlib.py", "heapq.py", "optparse.py", "pickletools.py", "sched.py", "textwrap.py",
)
DIGESTS = {
    "bdb.py": "314d8bf11b4824d4",
    "cmd.py": "fb82a8c4e44e5b55",
    "fileinput.py": "b0cd2a3f01c96f59",
    "queue.py": "f6c37fc37cd74409",
    "selectors.py": "1eeb102373e18c96",
    "shelve.py": "b978c6f0ffa901b0",
    "string.py": "24aeae1f0526250f",
    "trace.py": "e18581573c2b0e98",
    "difflib.py": "0c6afc23568d55b3",
    "gettext.py": "a5c249a522b6b8e3",
    "graphlib.py": "7bd338c5a475d110",
    "heapq.py": "6d43277e5c76fc0f",
    "optparse.py": "07d224301cba312f",
    "pickletools.py": "bcc8d00ebadd684a",
    "sched.py": "edfb309483d7cb05",
    "textwrap.py": "62867e40cdea6669",
}
SEPARATOR = b"\n\n"  # between files: a byte pair the files themselves contain, so no new symbol
_SKIPPED_DIRS = ("site-packages", "test", "tests", "idle_test")


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder (where ``os.py`` lives)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _read(root: Path, name: str) -> bytes:
    path = root / name
    if not path.is_file():
        raise ValueError(
            f"corpus file {name!r} not found under {root}: the calibration and held-out splits need the Python "
            "standard library's source files (CPython 3.11 or 3.12)"
        )
    return path.read_bytes()


def read_files(names: tuple[str, ...], root: Path | None = None) -> bytes:
    """The named files' bytes, in the given order, joined by ``SEPARATOR``."""
    root = stdlib_root() if root is None else Path(root)
    return SEPARATOR.join(_read(root, name) for name in names)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def check_digests(root: Path | None = None) -> dict[str, str]:
    """``{file: its digest here}`` for each named file whose content differs from the one the split was made on."""
    root = stdlib_root() if root is None else Path(root)
    named = (*CALIBRATION_FILES, *HELD_OUT_FILES)
    here = {name: digest(_read(root, name)) for name in named}
    return {name: value for name, value in here.items() if DIGESTS.get(name) != value}


def training_files(root: Path | None = None) -> list[Path]:
    """Every standard-library ``.py`` outside tests and site-packages, minus the named splits (sorted)."""
    root = stdlib_root() if root is None else Path(root)
    named = {*CALIBRATION_FILES, *HELD_OUT_FILES}
    out = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.as_posix() in named or any(part in _SKIPPED_DIRS for part in relative.parts[:-1]):
            continue
        out.append(path)
    return out


def read_training(root: Path | None = None) -> bytes:
    return SEPARATOR.join(path.read_bytes() for path in training_files(root))


def as_tokens(data: bytes) -> torch.Tensor:
    """Bytes as int64 token ids 0..255 (the byte-level vocabulary)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def windows(tokens: torch.Tensor, seq_len: int, count: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping ``[N, seq_len]`` windows from the start (the tail that does not fill one is dropped)."""
    n = tokens.numel() // seq_len if count is None else count
    if n < 1 or n * seq_len > tokens.numel():
        raise ValueError(f"{count} windows of {seq_len} bytes do not fit in {tokens.numel()} bytes")
    return tokens[: n * seq_len].view(n, seq_len)


def random_windows(tokens: torch.Tensor, seq_len: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` windows at random offsets (drawn from ``generator``): ``[count, seq_len]``."""
    if tokens.numel() <= seq_len:
        raise ValueError(f"windows of {seq_len} bytes need more than {tokens.numel()} bytes of text")
    starts = torch.randint(0, tokens.numel() - seq_len, (count,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
