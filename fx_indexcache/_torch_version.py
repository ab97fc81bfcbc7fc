"""The torch versions fx_indexcache is tested with, and a warning when the running torch is outside them.

The pass reads torch internals that change between releases (post-grad pass hooks, Inductor's mode table,
dynamo frames, AOTAutograd's graph metadata). A torch outside the tested range may work, or may rewrite
nothing, or fail in ways that look like a bug of the model; the warning names the versions so that a user
knows which case to suspect first. pyproject.toml's ``torch>=2.11,<2.14`` states the same bounds (a test
holds the two together).
"""

from __future__ import annotations

import re
import warnings

#: [lowest, first untested) as (major, minor); 2.11 and 2.13 are the versions the tests run on
TESTED_TORCH_RANGE: tuple[tuple[int, int], tuple[int, int]] = ((2, 11), (2, 14))


class UntestedTorchWarning(UserWarning):
    """The running torch is outside the range fx_indexcache is tested with."""


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as ``"2.13.0+cpu"`` or ``"2.14.0.dev20261201"``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"torch version {version!r}: expected one starting with MAJOR.MINOR, such as '2.13.0'")
    return int(match.group(1)), int(match.group(2))


def untested_torch_message(version: str) -> str | None:
    """The warning's text for a torch ``version`` outside the tested range, or None inside it."""
    low, high = TESTED_TORCH_RANGE
    if low <= torch_release(version) < high:
        return None
    return (f"fx_indexcache is tested with torch >= {low[0]}.{low[1]} and < {high[0]}.{high[1]} "
            f"(2.11 and 2.13); this is torch {version}. The pass depends on Inductor internals that change between "
            "releases: if a graph is not rewritten or compilation fails, try a tested torch first.")


def warn_if_untested_torch(version: str) -> None:
    """Warn (once per process: Python's default warning filter shows a warning once per call site)."""
    message = untested_torch_message(version)
    if message is not None:
        warnings.warn(message, UntestedTorchWarning, stacklevel=2)
