"""Programmatic dependent launch: whether our kernels are launched to overlap the kernel before them.

A kernel launched after another on a stream normally waits for that one to finish and its writes to drain before
the driver even schedules it. In decode, where a logits kernel takes ~4 us and the top-k ~14 us, hiding that wait
under the logits was worth 0.6-0.9 us of the step on an H100 (docs/kernels.md). On sm_90 on, a launch with the
programmatic-stream-serialization attribute may be scheduled as soon as every program of the kernel before it has
signalled (``griddepcontrol.launch_dependents``) or exited; the new kernel then runs ``griddepcontrol.wait``, which
returns once the kernel before has finished and its writes are visible. The contract that makes this exact on any
stream, whatever kernel comes before: a kernel launched this way executes the wait before its first access to
global memory (the CUDA top-k's ``wait_for_prior_grid``, the logits kernels' ``PDL`` branch). CUDA graphs capture
the launch as a programmatic edge (CUDA 12.3 on).

One decision per device and process: ``FX_INDEXCACHE_PDL`` (on unless 0/false/no/off), a device of compute
capability 9.0 or more, and a driver of CUDA 12.3 or more. The callers take it in decode only, where the gap is a
measurable part of the step: logits launches of at most ``DECODE_MAX_S`` queries, top-k launches of one wave of
blocks at most. Prefill launches stay plain: there the gap is a thousandth of the kernels, and it is not measured.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from ...envvars import PROGRAMMATIC_LAUNCH, env_flag

#: The driver version (cuDriverGetVersion) from which stream capture keeps a programmatic launch's edge.
MIN_DRIVER = 12030


def allowed(device: torch.device) -> bool:
    """Whether launches on ``device`` (a CUDA device) are programmatic: see the module's docstring."""
    return reason_not(device) is None


def reason_not(device: torch.device) -> "str | None":
    """None where launches on ``device`` are programmatic; else why not."""
    if device.type != "cuda":
        return f"{device} is not a CUDA device"
    return _reason_not(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _reason_not(device: int) -> "str | None":
    if not env_flag(PROGRAMMATIC_LAUNCH, default=True):
        return f"off by {PROGRAMMATIC_LAUNCH}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"compute capability {major}.{minor}: programmatic launch needs 9.0 or more"
    version = _driver_version()
    if version < MIN_DRIVER:
        return f"CUDA driver {version}: programmatic launch under graph capture needs {MIN_DRIVER} or more"
    return None


def _driver_version() -> int:
    from .nvrtc import CudaKernelUnavailable, _driver

    version = ctypes.c_int()
    try:
        if _driver().cuDriverGetVersion(ctypes.byref(version)) != 0:
            return 0
    except (CudaKernelUnavailable, OSError):
        return 0
    return version.value
