"""The Triton side of programmatic launch (``programmatic_launch``): the prologue a programmatically launched Triton
kernel runs before anything else. Imports Triton: only the kernel builders import it, when Triton runs."""

import triton

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - Triton before 3.4: launches stay plain
    gdc_launch_dependents = gdc_wait = None

#: Whether this Triton has the grid-dependency controls (else no launch is programmatic).
AVAILABLE = gdc_wait is not None


@triton.jit
def programmatic_prologue():
    """Wait for the kernel before this one on the stream to finish (its writes visible), then let the kernel after
    this one be scheduled: the first thing a programmatic launch does, before any access to global memory."""
    gdc_wait()
    gdc_launch_dependents()
