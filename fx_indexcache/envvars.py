"""The environment variables the package reads, each parsed in one place with the usual spellings.

A misspelt value fails naming the variable, the value and what is allowed, instead of being read as "on".
"""

from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """``name`` as a switch: 1/true/yes/on or 0/false/no/off (any case, surrounding spaces ignored); unset or
    empty gives ``default``."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not allowed; it must be one of "
                     f"{', '.join(_TRUE)} (on) or {', '.join(_FALSE)} (off)")


#: Whether the CUDA top-k kernels may run (off keeps the top-k on the Triton kernels everywhere).
CUDA_TOPK = "FX_INDEXCACHE_CUDA_TOPK"

#: Whether a kernel of ours that reads the output of the kernel before it (the CUDA top-k after the logits, the
#: logits after the projections) is launched to overlap that kernel's tail (programmatic dependent launch, sm_90 on).
PROGRAMMATIC_LAUNCH = "FX_INDEXCACHE_PDL"
