"""A pytest hook that appends each failing test's id and report to a file the moment it fails.

Where ``FX_INDEXCACHE_TEST_FAILURES`` names a file (``scripts/gpu_session.sh`` sets it), a device call cut short by
its deadline still brings back what failed and why; pytest prints that only in its summary at the end. The tests'
conftest imports the hook; ``pytest -p failure_log`` loads it elsewhere.
"""

from __future__ import annotations

import os

FAILURES_FILE = "FX_INDEXCACHE_TEST_FAILURES"


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get(FAILURES_FILE)
    if path and report.failed:
        with open(path, "a") as out:
            out.write(f"FAILED {report.nodeid} (in {report.when})\n{report.longreprtext[-8000:]}\n\n")
