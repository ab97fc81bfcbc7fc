"""Which ATen ops compute each query row of their output from the same query row of their inputs, and where that
row sits in each tensor.

Splitting an indexer's query rows across ranks (``shard_rows``) is exact only through such ops: an op whose
output row ``i`` is the same function of row ``i`` of its inputs wherever row ``i`` sits in the tensor. Pointwise
ops, casts, re-views that keep the row a whole block, reductions over other axes and the row side of a matrix
product are; an op that reads a row's *position* (``tril``, ``triu``, ``arange``, ``cumsum``, an index by
position) or mixes rows (a reduction over the row axis, a sort along it) is not. Such an op is never copied onto
a slice: its output is computed whole where it was and sliced afterwards, so the positions it encodes stay global.

``RowAxis(axis, inner, outer)`` says where the rows are in one tensor: ``axis`` holds ``outer`` blocks of T rows
of ``inner`` elements each, element ``(o*T + t)*inner + j`` belonging to row ``t`` (``inner`` > 1 when the row axis
was merged with the axes after it, as a ``[T, H]`` query re-viewed as ``[T*H]`` for a batched product; ``outer`` > 1
when it was merged with the axes before it, as a batch of requests ``[B, T, D]`` re-viewed as ``[B*T, D]`` for a
projection). ``input_rows`` answers, for one op, which axis of each input holds the rows
of an output row axis (None: the input is used whole, the same for every row), or None when the op is not
row-wise on that axis; ``sliced_arguments`` rewrites the shape arguments of the copy that runs on fewer rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import fx

from ..graph_utils import fake_value, packet

aten = torch.ops.aten

_REDUCTIONS = {aten.sum, aten.mean, aten.amax, aten.amin}
_VIEWS = {aten.view, aten._unsafe_view, aten.reshape}
_IDENTITIES = {aten.clone, aten.alias, aten._to_copy, aten.lift_fresh_copy, torch.ops.prims.convert_element_type}


@dataclasses.dataclass(frozen=True)
class RowAxis:
    """Where the query rows sit in one tensor: ``axis``, ``outer`` runs of the rows, each row ``inner`` elements."""

    axis: int
    inner: int = 1
    outer: int = 1

    def at(self, axis: int) -> RowAxis:
        """The same rows on another axis (an op that moves axes keeps the blocks)."""
        return dataclasses.replace(self, axis=axis)

    def size(self, rows: int) -> int:
        """The axis's size when it holds ``rows`` rows."""
        return self.outer * rows * self.inner


Demands = dict[fx.Node, RowAxis | None]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    value = fake_value(node)
    if not isinstance(value, torch.Tensor) or any(not isinstance(s, int) for s in value.shape):
        return None
    return tuple(value.shape)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [arg for arg in node.all_input_nodes if isinstance(fake_value(arg), torch.Tensor)]


def _pointwise(node: fx.Node) -> bool:
    op = node.target
    tags = getattr(op, "tags", ())
    schema = getattr(op, "_schema", None)
    return (torch.Tag.pointwise in tags and torch.Tag.nondeterministic_seeded not in tags
            and schema is not None and not schema.is_mutable)


def _broadcast(node: fx.Node, out: RowAxis, out_shape: Sequence[int]) -> Demands | None:
    """Each input aligned to the output from the right: it carries the rows where its size there is the output's,
    and is used whole where it has no such axis or size 1 (broadcast)."""
    demands: Demands = {}
    for arg in _tensor_inputs(node):
        shape = _shape(arg)
        if shape is None:
            return None
        axis = out.axis - (len(out_shape) - len(shape))
        if axis < 0 or shape[axis] == 1:
            demand = None
        elif shape[axis] == out_shape[out.axis]:
            demand = out.at(axis)
        else:
            return None
        if demands.setdefault(arg, demand) != demand:
            return None
    return demands


def _reduction(node: fx.Node, out: RowAxis, in_shape: Sequence[int]) -> Demands | None:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if not dims or not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None  # a reduction over every axis mixes the rows
    reduced = {d % len(in_shape) for d in dims}
    kept = list(range(len(in_shape))) if keepdim else [i for i in range(len(in_shape)) if i not in reduced]
    axis, source = kept[out.axis], node.args[0]
    return None if axis in reduced or not isinstance(source, fx.Node) else {source: out.at(axis)}


def _view(source: Sequence[int], target: Sequence[int], rows: RowAxis) -> RowAxis | None:
    """The row axis of a row-major re-view from ``target`` (where ``rows`` is) back to ``source``: the axis whose
    elements split into the same runs of the same rows (the same outer total before them, the same inner total
    after them)."""
    outer_total = math.prod(target[: rows.axis]) * rows.outer
    count = target[rows.axis] // (rows.outer * rows.inner)
    inner_total = rows.inner * math.prod(target[rows.axis + 1 :])
    for axis in range(len(source)):
        before = math.prod(source[:axis])
        if before == 0 or outer_total % before:
            continue
        outer = outer_total // before
        if source[axis] % (outer * count):
            continue
        inner = source[axis] // (outer * count)
        if inner * math.prod(source[axis + 1 :]) == inner_total:
            return RowAxis(axis, inner, outer)
    return None


def _contraction(node: fx.Node, out: RowAxis) -> Demands | None:
    """``mm``: rows of the output's axis 0 come from the left operand, of axis 1 from the right; ``bmm`` alike
    one axis on, and its batch axis from both."""
    left, right = node.args[0], node.args[1]
    if not isinstance(left, fx.Node) or not isinstance(right, fx.Node):
        return None
    offset = 1 if packet(node) is aten.bmm else 0
    if out.axis == offset:
        return {left: out.at(offset), right: None} if left is not right else None
    if out.axis == offset + 1:
        return {left: None, right: out.at(offset + 1)} if left is not right else None
    if offset and out.axis == 0:
        return {left: out, right: out}
    return None


def input_rows(node: fx.Node, out: RowAxis) -> Demands | None:
    """For a row axis ``out`` of ``node``'s output: the row axis of each tensor input (None: used whole), or None
    when ``node`` is not row-wise on that axis (it reads positions, mixes rows, or is not known here)."""
    if node.op != "call_function":
        return None
    out_shape = _shape(node)
    inputs = _tensor_inputs(node)
    if out_shape is None or not inputs:  # a factory (arange, ones): its values may be positions
        return None
    first = _shape(inputs[0])
    if first is None:
        return None
    kind = packet(node)
    if kind in _IDENTITIES or _pointwise(node):
        return _broadcast(node, out, out_shape)
    if kind in _REDUCTIONS:
        return _reduction(node, out, first)
    if kind in (aten.mm, aten.bmm):
        return _contraction(node, out)
    if kind is aten.expand and _broadcasts_rows(first, out_shape, out):
        return {inputs[0]: None}  # the same values for every row: used whole, the expand re-sized
    rows = _same_tensor_rows(node, out, out_shape, first)
    return None if rows is None else {inputs[0]: rows}


def _same_tensor_rows(node: fx.Node, out: RowAxis, out_shape: Sequence[int], in_shape: Sequence[int]
                      ) -> RowAxis | None:
    """Ops that move one tensor's values: re-views, permutations, expands, slices on other axes."""
    kind, args = packet(node), node.args
    if kind in _VIEWS:
        return _view(in_shape, out_shape, out)
    if kind is aten.unsqueeze:
        dim = args[1] % len(out_shape)
        return None if dim == out.axis else out.at(out.axis - (dim < out.axis))
    if kind is aten.squeeze:
        dims = args[1] if len(args) > 1 else range(len(in_shape))
        dims = {d % len(in_shape) for d in ([dims] if isinstance(dims, int) else dims)}
        kept = [i for i in range(len(in_shape)) if not (i in dims and in_shape[i] == 1)]
        return out.at(kept[out.axis])
    if kind is aten.permute:
        return out.at(args[1][out.axis] % len(in_shape))
    if kind in (aten.transpose, aten.t):
        first, second = (args[1] % len(in_shape), args[2] % len(in_shape)) if kind is aten.transpose else (0, 1)
        swap = {first: second, second: first}
        return out.at(swap.get(out.axis, out.axis))
    if kind is aten.expand:
        axis = out.axis - (len(out_shape) - len(in_shape))
        return out.at(axis) if in_shape[axis] == out_shape[out.axis] else None
    if kind is aten.slice:
        dim = (args[1] if len(args) > 1 else 0) % len(in_shape)
        return None if dim == out.axis else out
    if kind is aten.select:
        dim = args[1] % len(in_shape)
        return out.at(out.axis + (out.axis >= dim))
    return None


def sliced_arguments(node: fx.Node, out: RowAxis, rows: int, args: tuple) -> tuple:
    """``args`` (inputs already replaced by their slices) with the shape arguments of an op whose output now holds
    ``rows`` query rows: re-views and expands name every size, the row axis's among them."""
    if packet(node) not in (*_VIEWS, aten.expand):
        return args
    sizes = list(_shape(node) or ())
    sizes[out.axis] = out.size(rows)
    return (args[0], sizes, *args[2:])


def _broadcasts_rows(in_shape: Sequence[int], out_shape: Sequence[int], out: RowAxis) -> bool:
    """Whether an expand broadcasts its input along the row axis (the input has no such axis, or size 1 there)."""
    axis = out.axis - (len(out_shape) - len(in_shape))
    return axis < 0 or in_shape[axis] == 1
