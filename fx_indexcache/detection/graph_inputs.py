"""Which placeholders of a graph are model parameters, where something can tell.

A ``ReLU(x · W)`` projection and a ``ReLU(q · k)`` score whose keys arrive whole as a graph input
(a decode step's key cache) look alike in an ATen graph: both multiply an activation by a graph
input. Only knowing that the input is an ``nn.Parameter`` settles it. Dynamo knows (its graph
arguments hold the real tensors, in placeholder order) while it compiles, which is when the
pass runs inside a ``torch.compile`` backend; an exported program's signature knows too, and the
export entry point marks those placeholders in the graph itself (``mark_parameters``). Elsewhere the
answer is None: the structure alone cannot decide.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx

#: ``node.meta`` key an entry point sets on the placeholders it knows to be parameters (an export's signature).
PARAMETER_MARK = "fx_indexcache_parameter"


def mark_parameters(graph: fx.Graph, placeholder_names: Iterable[str]) -> None:
    """Mark the placeholders with these names as parameters, in the graph itself (an export's signature)."""
    names = frozenset(placeholder_names)
    for node in graph.find_nodes(op="placeholder"):
        node.meta[PARAMETER_MARK] = node.name in names


def parameter_placeholders(graph: fx.Graph) -> frozenset[fx.Node] | None:
    """The placeholders of ``graph`` that hold parameters, or None when nothing can tell."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if placeholders and all(PARAMETER_MARK in node.meta for node in placeholders):
        return frozenset(node for node in placeholders if node.meta[PARAMETER_MARK])
    return _from_dynamo(placeholders)


def input_name(graph: fx.Graph, node: fx.Node) -> str:
    """A placeholder as the user wrote it (dynamo's source, ``L['self'].layers[0].wq``), where the graph's inputs
    line up with the frame dynamo is compiling; else the node's own name."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    graphargs = _dynamo_graphargs(placeholders)
    if graphargs is not None and node in placeholders:
        name = source_name(getattr(graphargs[placeholders.index(node)], "source", None))
        if name is not None:
            return name
    return node.name


def source_name(source) -> str | None:
    """A dynamo source as the user wrote it (``L['self'].layers[0].wq``; a method in some torch versions, an
    attribute in others), or None."""
    name = getattr(source, "name", None)
    if name is None:
        return None
    return name() if callable(name) else str(name)


def current_graphargs() -> list | None:
    """The graph arguments (real tensors and their sources) of the frame dynamo is compiling now, else None."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return list(InstructionTranslator.current_tx().output.graphargs)
    except Exception:  # noqa: BLE001 - not inside a dynamo compile, or a torch without these internals
        return None


def _dynamo_graphargs(placeholders: list[fx.Node]) -> list | None:
    """The graph arguments of the frame dynamo is compiling, one to one with ``placeholders``, else None."""
    graphargs = current_graphargs()
    if graphargs is None or len(graphargs) != len(placeholders):
        return None
    for node, arg in zip(placeholders, graphargs):
        example = getattr(arg, "example", None)
        value = node.meta.get("val")
        if isinstance(example, torch.Tensor) != isinstance(value, torch.Tensor):
            return None
        if isinstance(example, torch.Tensor) and example.dim() != value.dim():
            return None
    return graphargs


def _from_dynamo(placeholders: list[fx.Node]) -> frozenset[fx.Node] | None:
    """Match the graph's inputs to the frame dynamo is compiling; None unless they line up one to one."""
    graphargs = _dynamo_graphargs(placeholders)
    if graphargs is None:
        return None
    return frozenset(node for node, arg in zip(placeholders, graphargs)
                     if isinstance(getattr(arg, "example", None), torch.nn.Parameter))
