"""The availability probes the GPU tests share: CUDA and an importable Triton; compute-sanitizer."""

import os
import shutil

import pytest
import torch


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401  (availability probe)
    except Exception:
        return False
    return True


HAS_GPU = torch.cuda.is_available() and _has_triton()
#: Mark a test (or a module, as ``pytestmark``) that needs CUDA and Triton.
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and Triton")


def sanitizer_path() -> "str | None":
    """compute-sanitizer's path (on PATH or in CUDA's usual folders), or None where it is not installed."""
    found = shutil.which("compute-sanitizer")
    for p in ("/usr/local/cuda/bin/compute-sanitizer", "/opt/nvidia/cuda/bin/compute-sanitizer"):
        found = found or (p if os.path.exists(p) else None)
    return found
