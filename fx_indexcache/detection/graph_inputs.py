"""Which placeholders of a graph are model parameters, where something can tell.

A ``ReLU(x · W)`` projection and a ``ReLU(q · k)`` score whose keys arrive whole as a graph input
(a decode step's key cache) look alike in an ATen graph: both multiply an activation by a graph
input. Only knowing that the input is an ``nn.Parameter`` settles it. Dynamo knows (its graph
arguments hold the real tensors, in placeholder order) while it compiles, which is when the
pass runs inside a ``torch.compile`` backend; an exported program's signature knows too
(``declared_parameters``). Elsewhere the answer is None: the structure alone cannot decide.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

import torch
from torch import fx

_DECLARED: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("fx_indexcache_params", default=None)


@contextlib.contextmanager
def declared_parameters(placeholder_names: Iterable[str]) -> Iterator[None]:
    """Within the block, the placeholders with these names are the parameters (an export's signature)."""
    token = _DECLARED.set(frozenset(placeholder_names))
    try:
        yield
    finally:
        _DECLARED.reset(token)


def parameter_placeholders(graph: fx.Graph) -> frozenset[fx.Node] | None:
    """The placeholders of ``graph`` that hold parameters, or None when nothing can tell."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    declared = _DECLARED.get()
    if declared is not None:
        return frozenset(node for node in placeholders if node.name in declared)
    return _from_dynamo(placeholders)


def _from_dynamo(placeholders: list[fx.Node]) -> frozenset[fx.Node] | None:
    """Match the graph's inputs to the frame dynamo is compiling; None unless they line up one to one."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        graphargs = list(tx.output.graphargs)
    except Exception:  # noqa: BLE001 - not inside a dynamo compile, or a torch without these internals
        return None
    if len(graphargs) != len(placeholders):
        return None
    found = set()
    for node, arg in zip(placeholders, graphargs):
        example = getattr(arg, "example", None)
        value = node.meta.get("val")
        if isinstance(example, torch.Tensor) != isinstance(value, torch.Tensor):
            return None
        if isinstance(example, torch.Tensor) and example.dim() != value.dim():
            return None
        if isinstance(example, torch.nn.Parameter):
            found.add(node)
    return frozenset(found)
