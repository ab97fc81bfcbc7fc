"""Where a torch.compile user looks for what the pass did: the table's columns, TORCH_LOGS, the structured trace."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from test_observability import _compile_fsfs

from fx_indexcache.report.trace import REPORT_ARTIFACT


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.artifacts: list[tuple[dict, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        metadata = getattr(record, "metadata", {})
        if "artifact" in metadata:
            self.artifacts.append((metadata["artifact"], record.payload))


@pytest.fixture
def structured_trace():
    """What torch's structured trace (TORCH_TRACE) would write, collected in memory."""
    trace_log = logging.getLogger("torch.__trace")
    handler = _Collect()
    trace_log.addHandler(handler)
    try:
        yield handler
    finally:
        trace_log.removeHandler(handler)


def test_each_report_is_a_structured_trace_artifact(structured_trace):
    backend = _compile_fsfs()  # FSFS on a 4-layer model: layers 1 and 3 share
    reports = [json.loads(payload) for meta, payload in structured_trace.artifacts if meta["name"] == REPORT_ARTIFACT]
    metas = [meta for meta, _ in structured_trace.artifacts if meta["name"] == REPORT_ARTIFACT]
    assert metas and all(meta["encoding"] == "json" for meta in metas)
    (record,) = reports  # one compiled graph
    assert record["pattern"] == "FSFS" and record["indexers_removed"] == 2
    assert [(row["layer"], row["marked"], row["action"], row["source_layer"]) for row in record["layers"]] == [
        (0, "F", "computed", 0), (1, "S", "shared", 0), (2, "F", "computed", 2), (3, "S", "shared", 2)]
    assert [row["nodes_removed"] > 0 for row in record["layers"]] == [False, True, False, True]
    assert record["table"] == backend.reports[-1].format()


def test_the_table_says_what_its_columns_hold():
    import fx_indexcache

    _compile_fsfs()
    table = fx_indexcache.reports()[-1].format().splitlines()
    header = table[1]
    assert header.split()[:2] == ["layer", "F/S"] and "indices from layer" in header and "FX nodes removed" in header
    rows = {line.split()[0]: line.split() for line in table[2:6]}
    # the S layers take layer 0's and layer 2's indices, and the values sit under their headers
    assert rows["1"][2] == "0" and rows["3"][2] == "2"
    column_end = header.index("indices from layer") + len("indices from layer")
    assert all(line[column_end - 1] in "0123456789" for line in table[2:6])


def test_torch_logs_turns_on_the_package_loggers():
    code = ("import logging, fx_indexcache; "
            "print(logging.getLogger('fx_indexcache.report.graph_report').getEffectiveLevel())")
    env = {**os.environ, "TORCH_LOGS": "+fx_indexcache"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == str(logging.DEBUG)
