"""Per layer of one model: did it share inside its graph, across graphs, or compute, and why.

Two sources make the table: the compile-time reports (layers numbered inside a graph: the pass shared
or left them there, including ``nested_compile_region`` calls switched to F / S bodies) and the run-time records
of graphs that share across graph calls (``cross_graph``: a graph that runs as several layers, or a numbered
graph whose leading S layers read an earlier graph's indices; which graph published the indices a layer read,
or why it computed). A layer seen at run time takes
its row from there: that is what its latest forward call did.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

from torch import nn

from ..rewrite.indices_io import CallAction
from ..rewrite.share import SHARED
from ..session import IndexCacheSession, default_session
from .graph_report import IndexCacheReport


class Sharing(str, enum.Enum):
    INSIDE_GRAPH = "shared inside its graph"
    ACROSS_GRAPHS = "shared across graph calls"
    COMPUTED = "computed"


@dataclasses.dataclass(frozen=True)
class LayerSharing:
    layer: int
    sharing: Sharing
    source_layer: int  # the layer whose indices it used (itself when it computed)
    graph: str  # the graph that ran it: a report's name or dynamo's compile id
    source_graph: str | None = None  # ACROSS_GRAPHS: the graph that published the indices
    publishes: bool = False  # computed and published its indices for later S layers
    why: str = ""


def _from_reports(reports: Iterable[IndexCacheReport]) -> dict[int, LayerSharing]:
    rows = {}
    for report in reports:
        for decision in report.decisions:
            if decision.layer is None:
                continue
            how = Sharing.INSIDE_GRAPH if decision.action == SHARED else Sharing.COMPUTED
            rows[decision.layer] = LayerSharing(decision.layer, how, decision.source_layer, report.graph_name,
                                                why=decision.note)
        for call in report.regional:  # nested_compile_region calls: shared inside the outer graph
            if call.layer is None:
                continue
            read = call.action is CallAction.READ
            rows[call.layer] = LayerSharing(
                call.layer, Sharing.INSIDE_GRAPH if read else Sharing.COMPUTED,
                call.source_layer if read else call.layer, report.graph_name,
                publishes=call.action is CallAction.PUBLISHED, why=call.note or f"region body {call.body}")
    return rows


def layer_sharing(model: nn.Module, reports: Iterable[IndexCacheReport] | object = ()) -> list[LayerSharing]:
    """The table for ``model``: ``reports`` is the backend (or session) that compiled it, or its graphs' reports
    (then the run-time records come from the default session)."""
    owner = getattr(reports, "session", reports)
    session = owner if isinstance(owner, IndexCacheSession) else default_session()
    rows = _from_reports(session.reports() if owner is session else reports)  # type: ignore[arg-type]
    for call in session.layer_calls(model):
        if call.action is CallAction.READ:
            row = LayerSharing(call.layer, Sharing.ACROSS_GRAPHS, call.source_layer, call.graph, call.source_graph,
                               why=f"graph {call.source_graph} published layer {call.source_layer}'s indices in this "
                                   "forward call and the layers since ran consecutively")
        else:
            why = "" if call.fallback is None else call.fallback.value
            row = LayerSharing(call.layer, Sharing.COMPUTED, call.layer, call.graph,
                               publishes=call.action is CallAction.PUBLISHED, why=why)
        rows[call.layer] = row
    return [rows[layer] for layer in sorted(rows)]


def format_layer_sharing(rows: list[LayerSharing]) -> str:
    lines = [f"{'layer':>5}  {'indices from layer':>18}  {'graph':>7}  {'from':>7}  how"]
    for row in rows:
        how = row.sharing.value + (", publishes its indices" if row.publishes else "")
        why = f" ({row.why})" if row.why else ""
        lines.append(f"{row.layer:>5}  {row.source_layer:>18}  {row.graph:>7}  {row.source_graph or '':>7}  {how}{why}")
    return "\n".join(lines)
