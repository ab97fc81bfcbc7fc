"""What the backend decides for a graph that shares with the model's other graphs at run time: the plan the report
shows, why a graph does not share (``CrossGraphOff``), and the indices a call makes or takes, as expressions of the
graph's input sizes (``expected_indices``)."""

from __future__ import annotations

import dataclasses
import enum

import torch
from torch import fx

from ..config import SHARED, IndexCacheConfig
from ..graph_utils import fake_value
from .runtime import ExpectedIndices

#: How far to look for an S layer in a pattern given only by freq/offset.
_PATTERN_HORIZON = 256


class CrossGraphOff(str, enum.Enum):
    """Why a graph does not share across graphs (it computes as before)."""

    TRAINING = "not an inference graph (gradients enabled): every layer computes"
    NOT_ONE_SITE = "the graph holds more than one indexer: it is not one layer's graph"
    SITE_REFUSES = "its indexer's indices cannot be replaced"
    NO_S_LAYER = "the pattern has no S layer with an F layer before it"
    NO_MODEL = "no module on the call stack has numbered layers owning parameters"
    UNBOUND_SHAPE = "the indices' shape uses a size no graph input carries, so it cannot be checked per call"
    INDEXER_STILL_NEEDED = "without its indices the indexer is still needed by the rest of the graph"
    TWO_CONTAINERS = "its indexers' module paths name more than one layer container"


@dataclasses.dataclass(frozen=True)
class CrossGraphPlan:
    """What the backend does for one graph that shares with the model's other graphs at run time.

    Either a graph whose layer is known only at call time (``numbered`` False), or a numbered graph whose
    leading S layers read an earlier graph's indices (``reads``: the last F layer that ran before them) or whose last F layer
    publishes them for a later graph (``publishes``).
    """

    graph: str  # dynamo's compile id
    active: bool
    off: CrossGraphOff | None = None
    detail: str = ""
    s_nodes_removed: int = 0  # nodes the S variant does not run
    numbered: bool = False
    reads: tuple[int, ...] = ()
    publishes: int | None = None

    def note(self) -> str:
        if self.active and self.numbered:
            parts = []
            if self.reads:
                parts.append(f"layers {', '.join(map(str, self.reads))} read the indices of the last F layer that ran "
                             f"before them, published by an earlier graph ({self.s_nodes_removed} nodes not run) when "
                             "the host check passes, else the graph runs as it is")
            if self.publishes is not None:
                parts.append(f"layer {self.publishes} publishes its indices for later graphs")
            return f"cross-graph: graph {self.graph}: " + "; ".join(parts) + "; see fx_indexcache.layer_calls(model)"
        if self.active:
            return (f"cross-graph: graph {self.graph} runs as several layers; per call, its parameters give the layer: "
                    f"F layers publish their indices, S layers read their F layer's ({self.s_nodes_removed} nodes "
                    "not run) when the host check passes, else it computes; see fx_indexcache.layer_calls(model)")
        detail = f" ({self.detail})" if self.detail else ""
        return f"cross-graph sharing off for graph {self.graph}: {self.off.value}{detail}"


@dataclasses.dataclass
class Variants:
    f_graph: fx.GraphModule
    f_inputs: list
    s_graph: fx.GraphModule
    s_inputs: list
    expected: ExpectedIndices


def has_s_layer(config: IndexCacheConfig, model_layers: int | None) -> bool:
    horizon = layer_horizon(config, model_layers)
    return any(config.layer_kind(i) == SHARED and config.source_layer(i) is not None for i in range(horizon))


def _size_expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def expected_indices(graph: fx.Graph, site) -> ExpectedIndices | None:
    """The site's indices shape and key width as expressions of graph-input sizes; None if one is bound by
    no input (then nothing can be checked per call)."""
    indices, score = fake_value(site.indices), fake_value(site.anchor.args[0])
    if not isinstance(indices, torch.Tensor) or not isinstance(score, torch.Tensor):
        return None
    dim = site.key_axis()
    sizes = tuple(_size_expr(s) for s in (*indices.shape, score.shape[dim]))
    needed = set().union(*(getattr(s, "free_symbols", set()) for s in sizes))
    bound: dict = {}
    for position, node in enumerate(graph.find_nodes(op="placeholder")):
        value = fake_value(node)
        dims = [(None, value)] if isinstance(value, torch.SymInt) else (
            list(enumerate(value.shape)) if isinstance(value, torch.Tensor) else [])
        for at, size in dims:
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            if expr is not None and expr.is_Symbol and expr in needed:
                bound.setdefault(expr, (expr, position, at))
    if needed - set(bound):
        return None
    sizes = tuple(int(s) if not getattr(s, "free_symbols", None) else s for s in sizes)
    return ExpectedIndices(sizes, tuple(bound.values()), indices.dtype, indices.device, site.frame().portable())


def layer_horizon(config: IndexCacheConfig, model_layers: int | None) -> int:
    """How many decoder layers there are: the config's layer count, the model's (from its config), the explicit
    pattern's length, else ``_PATTERN_HORIZON``. A graph that ends at the last layer then publishes nothing, so it
    is compiled once."""
    known = [n for n in (config.num_layers, model_layers, len(config.explicit_pattern or "")) if n]
    return min(known) if known else _PATTERN_HORIZON


