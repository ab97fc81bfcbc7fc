"""The Triton top-k (``kernels.topk``) on the CPU, under Triton's interpreter, on small rows.

Runs ``tests/topk_cases.py`` in a subprocess with ``TRITON_INTERPRET=1`` (the variable must be set
before Triton is imported): fresh random rows, -inf padding, all-masked rows, repeated values, -0.0,
k = T, sorted and unsorted, and capacities small enough that every path of the kernel (direct,
candidates, threshold ties, exact fallback) is taken -- the script asserts each one ran.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent


def test_row_topk_every_path_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    done = subprocess.run([sys.executable, str(HERE / "topk_cases.py")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ok [0, 1, 2, 3]" in done.stdout
