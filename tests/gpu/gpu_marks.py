"""The one availability probe the GPU tests share: CUDA and an importable Triton."""

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
