"""What an indexer's indices *mean*: the token positions its score's rows and keys stand for, and what the layer
does to the indices before its attention reads them.

Sharing hands an S layer the F layer's top-k indices in place of its own, and everything after the top-k stays the
S layer's. That is the engines' IndexCache only where both layers' indices name the same tokens: each score's axes
come from the layer's tokens through the same positional steps (no layer-specific slice, shift, gather or pad of
its keys or queries), and each layer maps its indices to positions the same way (no layer-specific offset). A
layer that scores ``keys[2:10]`` while its F layer scores ``keys[0:8]`` has scores of equal width, so shapes prove
nothing: index 0 is token 2 in one and token 0 in the other, and sharing would silently read other tokens.

``IndexFrame`` records those steps as a comparable value, and two sites share only where their frames are equal.
The walk from a score stops at the layer's own data: a projection (a contraction with a weight), a graph input,
or ``_WALK`` nodes. Only positional steps on axes of a token count's size count (slices, gathers,
concatenations, shifts, pads): a reshape keeps the order of what it views, a slice of a whole axis is no step, and
a split of a head's features moves no token. Values (a per-layer weight, a scale, a mask) may differ, and data
tensors count only by their shapes. A tensor that *chooses positions* (an index, a gather's index) counts by the
computation that makes it: constants by value, so each layer's own offsets differ; a graph input as an input,
since each layer's cache positions arrive as inputs of their own that hold equal values (transformers' static
cache), which the graph cannot tell from a per-layer position table handed in; a computation from the layer's
activations (data-dependent pooling) as data, the layer's own choice as its top-k is.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable

import torch
from torch import fx

from ..graph_utils import (CASTS, CONTRACTIONS, IDENTITIES, PERMUTES, RESHAPES, fake_value, is_call, packet,
                           same_shape, same_size)

aten = torch.ops.aten

#: Ops that choose, move or re-group positions along an axis: their arguments are part of the frame.
POSITIONAL = {
    aten.slice, aten.narrow, aten.select, aten.index, aten.index_select, aten.gather, aten.take, aten.cat,
    aten.stack, aten.roll, aten.flip, aten.constant_pad_nd, aten.pad, aten.as_strided, aten.unfold, aten.split,
    aten.split_with_sizes, aten.chunk, aten.unbind, aten.diagonal, aten.repeat, aten.repeat_interleave,
    aten.index_put, aten.slice_scatter, aten.select_scatter, aten.scatter, aten.narrow_copy,
}
#: Index arguments (by position) of the positional ops that take one: they count by the computation behind them.
_INDEX_ARGS = {aten.index: 1, aten.index_select: 2, aten.gather: 2, aten.take: 1, aten.index_put: 1,
               aten.scatter: 2}
#: Ops the layer may apply to its indices before reading with them, changing which token an index names; the chain
#: is followed through these. A mask (``where``, ``masked_fill``: -1 for a slot that selects nothing) is no such
#: step: it marks slots, it does not move them.
_INDEX_ARITHMETIC = {
    aten.add, aten.sub, aten.mul, aten.div, aten.floor_divide, aten.remainder, aten.fmod, aten.neg,
    aten.clamp, aten.clamp_min, aten.clamp_max, aten.bitwise_and, aten.bitwise_or, aten.bitwise_xor,
    aten.minimum, aten.maximum,
} | RESHAPES | PERMUTES | IDENTITIES | CASTS
_WALK = 400  # nodes walked up from a score: the indexer's own ops, far more than any indexer has
_INDEX_DEPTH = 24  # nodes of a position-choosing tensor's computation described
_CHAIN = 16  # ops followed from the indices towards their readers


@dataclasses.dataclass(frozen=True)
class IndexFrame:
    """The positional steps from a layer's tokens to its score (``score``; a walk cut at ``_WALK`` nodes covers
    alike steps of layers written alike), and from its indices to what its attention reads (``indices``), each
    sorted."""

    score: tuple[str, ...]
    indices: tuple[str, ...]

    def portable(self) -> str | None:
        """The frame as text that compares across graphs (a layer graph run as several layers, graphs split by a
        break): sizes' symbols, which each graph names for itself, as ``s?``; None where an attribute of the graph
        chooses positions (its name is this graph's own)."""
        text = repr((self.score, self.indices))
        if re.search(r"<(?!data-dependent>|input>)[^<>]*>", text):
            return None
        return re.sub(r"\b(?:s|u|zuf|zf|ps|c)\d+\b", "s?", text)

    def difference(self, source: IndexFrame, source_name: str) -> str | None:
        """Why indices from a layer of frame ``source`` name other tokens than ours would, or None."""
        if self.indices != source.indices:
            return (f"this layer maps its indices to positions otherwise than {source_name} "
                    f"({_first_difference(self.indices, source.indices)}): shared, they would name other tokens")
        if self.score != source.score:
            return (f"its score's rows or keys come from the layer's tokens otherwise than {source_name}'s "
                    f"({_first_difference(self.score, source.score)}): the same index names another token")
        return None


def _first_difference(mine: tuple[str, ...], theirs: tuple[str, ...]) -> str:
    for a, b in zip(mine, theirs):
        if a != b:
            return f"{a} against {b}"
    longer, name = (mine, "this layer") if len(mine) > len(theirs) else (theirs, "the other")
    return f"{name} also runs {longer[min(len(mine), len(theirs))]}"


def index_frame(anchor: fx.Node, indices: fx.Node) -> IndexFrame:
    """The frame of the selection ``anchor`` (a top-k, a sort, an op computing indices) whose indices are
    ``indices``."""
    try:
        return IndexFrame(_score_steps(anchor), _index_chain(indices))
    except Exception as error:  # noqa: BLE001 - an op this reader does not know: no proof, never a crash
        return IndexFrame((f"unreadable at {anchor.name}#{id(anchor)} ({type(error).__name__})",), ())


def _token_sizes(anchor: fx.Node) -> list:
    """The sizes of the selection's score axes (its rows and keys; 1 left out): an axis of another size holds no
    tokens the score's axes come from (a head's features, split for rotary embedding, say)."""
    score = fake_value(anchor.args[0]) if anchor.args and isinstance(anchor.args[0], fx.Node) else None
    return [size for size in score.shape if not same_size(size, 1)] if isinstance(score, torch.Tensor) else []


def _score_steps(anchor: fx.Node) -> tuple[str, ...]:
    seen: set[fx.Node] = set()
    frontier = list(anchor.all_input_nodes)
    positional: list[fx.Node] = []
    tokens = _token_sizes(anchor)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        if len(seen) >= _WALK:
            break
        seen.add(node)
        if node.op != "call_function":
            continue
        if _is_projection(node):
            frontier.extend(_activation_views(node, positional, seen, tokens))
            continue
        if is_call(node, POSITIONAL) and _moves_tokens(node, tokens):
            positional.append(node)
        frontier.extend(node.all_input_nodes)
    return _described(positional)


def _is_projection(node: fx.Node) -> bool:
    """A contraction with a weight (a graph input or attribute, through views): the layer's own data begins
    there."""
    if not is_call(node, CONTRACTIONS):
        return False
    return any(_through(arg).op in ("placeholder", "get_attr") for arg in node.all_input_nodes)


def _through(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and is_call(node, POSITIONAL | PERMUTES | IDENTITIES | CASTS) and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _activation_views(projection: fx.Node, positional: list[fx.Node], seen: set[fx.Node], tokens: list
                      ) -> list[fx.Node]:
    """Record the positional steps on a projection's operands (``x[2:10] @ wk``) up to the data they view; walk
    on only into the tensors those steps take as indices."""
    onward: list[fx.Node] = []
    for arg in projection.all_input_nodes:
        node = arg
        while node.op == "call_function" and node not in seen and is_call(node, POSITIONAL | PERMUTES | IDENTITIES
                                                                           | CASTS) and node.args:
            seen.add(node)
            if is_call(node, POSITIONAL) and _moves_tokens(node, tokens):
                positional.append(node)
                onward.extend(_index_tensors(node))
            if not isinstance(node.args[0], fx.Node):
                break
            node = node.args[0]
    return onward


#: Where each positional op names the axis it works on: (argument position, default); absent: any axis.
_AXIS_ARG = {aten.slice: (1, 0), aten.narrow: (1, None), aten.select: (1, None), aten.index_select: (1, None),
             aten.gather: (1, None), aten.cat: (1, 0), aten.stack: (1, 0), aten.split: (2, 0),
             aten.split_with_sizes: (2, 0), aten.chunk: (2, 0), aten.unbind: (1, 0), aten.unfold: (1, None),
             aten.narrow_copy: (1, None), aten.slice_scatter: (2, 0), aten.select_scatter: (2, None),
             aten.scatter: (1, None), aten.roll: (2, None), aten.flip: (1, None), aten.repeat_interleave: (2, None)}


def _moves_tokens(node: fx.Node, tokens: list) -> bool:
    """Whether a positional op works on an axis that may hold the score's tokens (one of their sizes); a whole
    slice moves nothing."""
    if _whole(node):
        return False
    where = _AXIS_ARG.get(packet(node))
    data = node.args[0] if node.args else None
    if isinstance(data, (list, tuple)):
        data = data[0] if data else None
    value = fake_value(data) if isinstance(data, fx.Node) else None
    if where is None or not isinstance(value, torch.Tensor) or not tokens:
        return True
    position, default = where
    axes = node.args[position] if len(node.args) > position else node.kwargs.get("dim", default)
    if axes is None:
        return True
    for axis in axes if isinstance(axes, (list, tuple)) else [axes]:
        if not isinstance(axis, int) or not -value.dim() <= axis < value.dim():  # stack's new axis, say
            return True
        if any(same_size(value.shape[axis], size) for size in tokens):
            return True
    return False


def _whole(node: fx.Node) -> bool:
    """A slice that keeps its whole axis (Inductor and export add and drop these freely)."""
    if packet(node) is not aten.slice:
        return False
    source, value = fake_value(node.args[0]), fake_value(node)
    return (isinstance(source, torch.Tensor) and isinstance(value, torch.Tensor)
            and same_shape(source.shape, value.shape) and (len(node.args) < 5 or node.args[4] == 1))


def _index_tensors(node: fx.Node) -> list[fx.Node]:
    position = _INDEX_ARGS.get(packet(node))
    if position is None or len(node.args) <= position:
        return []
    value = node.args[position]
    items = value if isinstance(value, (list, tuple)) else [value]
    return [item for item in items if isinstance(item, fx.Node)]


def _described(nodes: list[fx.Node]) -> tuple[str, ...]:
    """The steps, sorted: a frame is the set of steps taken, whatever order the graph lists them in."""
    return tuple(sorted(_step(node) for node in set(nodes)))


def _step(node: fx.Node) -> str:
    """``slice(•, 0, 2, 10)``: the op, its data as ``•`` (a list of them by their shapes), its index tensors by
    their computation, other tensors by their shapes, everything else by value."""
    op = packet(node)
    index_at = _INDEX_ARGS.get(op)
    args = []
    for position, arg in enumerate(node.args):
        if position == 0:
            args.append(_data(arg))
        elif position == index_at:
            args.append(_index_argument(arg))
        else:
            args.append(_plain(arg))
    kwargs = [f"{key}={_plain(value)}" for key, value in sorted(node.kwargs.items())]
    return f"{getattr(op, '__name__', str(op))}({', '.join(args + kwargs)})"


def _data(arg) -> str:
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_shape(item) for item in arg) + "]"
    return "•"


def _shape(arg) -> str:
    value = fake_value(arg) if isinstance(arg, fx.Node) else None
    return f"•{tuple(value.shape)}" if isinstance(value, torch.Tensor) else "•"


def _argument(arg, tensor: Callable[[fx.Node], str]) -> str:
    """An argument by value (a size by its expression), a tensor as ``tensor`` describes it."""
    if isinstance(arg, fx.Node):
        value = fake_value(arg)
        return tensor(arg) if isinstance(value, torch.Tensor) or value is None else str(value)
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_argument(item, tensor) for item in arg) + "]"
    return repr(arg)


def _plain(arg) -> str:
    """An argument of a positional step that chooses no positions: a tensor (the values a scatter writes) by its
    shape."""
    return _argument(arg, _shape)


def _operand(arg) -> str:
    """What a layer combines its indices with (``idx + off``): a tensor as a position-choosing argument."""
    return _argument(arg, _index_argument)


_DATA = "<data-dependent>"


def _index_argument(arg) -> str:
    """A position-choosing argument: by its computation where that is a table or arithmetic of positions, else (a
    product with the layer's activations inside, as a data-dependent pooling computes its gather) as data, which
    compares equal: such positions are the layer's own choice, as its top-k is."""
    described = _chosen(arg)
    return _DATA if _DATA in described or "…" in described else described


def _chosen(arg, depth: int = _INDEX_DEPTH) -> str:
    """A position-choosing argument by the computation that makes it: constants by value, attributes by name, a
    graph input as an input (each layer's cache position is its own input, equal in value; ``_INDEX_DEPTH`` nodes,
    then ``…``)."""
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_chosen(item, depth) for item in arg) + "]"
    if not isinstance(arg, fx.Node):
        return repr(arg)
    if arg.op == "placeholder":  # positions handed in (a cache position per layer, equal in value): a role
        return "<input>"
    if arg.op == "get_attr":
        return f"<{arg.target}>"
    if depth <= 0:
        return "…"
    if is_call(arg, CONTRACTIONS):
        return _DATA
    if arg.target is operator.getitem:
        return f"{_chosen(arg.args[0], depth - 1)}[{arg.args[1]}]"
    target = packet(arg)
    inner = [_chosen(item, depth - 1) if isinstance(item, (fx.Node, list, tuple)) else repr(item)
             for item in arg.args]
    inner += [f"{key}={_chosen(value, depth - 1)}" for key, value in sorted(arg.kwargs.items())
              if isinstance(value, (fx.Node, list, tuple))]
    inner += [f"{key}={value!r}" for key, value in sorted(arg.kwargs.items())
              if not isinstance(value, (fx.Node, list, tuple))]
    return f"{getattr(target, '__name__', str(target))}({', '.join(inner)})"


def _index_chain(indices: fx.Node) -> tuple[str, ...]:
    """The arithmetic a layer applies to its indices before reading with them (``idx + 2``), breadth first, as
    steps with the indices as ``•``."""
    steps: list[str] = []
    frontier, seen = [indices], {indices}
    while frontier and len(steps) < _CHAIN:
        node = frontier.pop(0)
        for user in sorted(node.users, key=lambda n: n.name):
            if user in seen or not is_call(user, _INDEX_ARITHMETIC):
                continue
            seen.add(user)
            args = ["•" if arg is node else _operand(arg) for arg in user.args]
            steps.append(f"{getattr(packet(user), '__name__', str(packet(user)))}({', '.join(args)})")
            frontier.append(user)
    return tuple(sorted(steps))
