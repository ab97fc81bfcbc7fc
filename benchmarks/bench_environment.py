"""What every benchmark record names: the card, its driver, torch, CUDA, Triton, the commit measured and the date.

``BENCH_COMMIT`` gives the commit where the tree has no ``.git`` (the device machine gets a copy of the files).
"""

from __future__ import annotations

import os
import subprocess
import time

import torch


def _run(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def describe_machine() -> dict:
    """``{device, driver, torch, cuda, triton, commit, date}``; a part that cannot be read says "unknown"."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "unknown"
    cuda = torch.cuda.is_available()
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "unknown" if cuda else "-"
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "triton": triton_version,
        "commit": os.environ.get("BENCH_COMMIT") or _run(["git", "rev-parse", "HEAD"]) or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
