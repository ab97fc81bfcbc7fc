"""Prove two sizes in one graph equal, also when they are data-dependent (unbacked) symbols.

Two layers of a pooled indexer (GLM-5.3-Flash's k-pool) each compute their top-k width as
``min(index_topk // kpool, pooled length)``, where the pooled length is the number of ``True``
entries of a boolean mask (``pool_keys[:, keep]``): an unbacked symbol, ``u0`` in one layer and
``u1`` in the next. The symbols differ, yet the two widths are equal whenever the two masks are
the same value. This module proves exactly that and nothing more:

* every unbacked symbol is traced to the node that defines it (``meta["unbacked_bindings"]``) and
  given a *size key*: what its value depends on (for a boolean-mask index, the mask's value and
  the indexed shape; for ``.item()``, the scalar's value), never the data that only rides along;
* values are compared by *value numbering*: two nodes are the same value when they apply the same
  deterministic op to the same values. A few identities of the graphs torch traces are applied on
  the way (a ``cat`` with an empty legacy operand, a ``split`` of a ``cat`` at the cat's own
  boundaries, a ``select`` inside one ``cat`` operand), so that a layer's validity channel packed
  next to its own keys is seen to be the shared attention mask;
* graph inputs, random or bitwise-nondeterministic ops, and anything mutated in place are values
  of their own, equal to nothing else. Two layers reading their own cache inputs are therefore never
  proven equal (their masks may differ), which is the honest answer for a decode graph.

A size pair is then equal when substituting each unbacked symbol by a representative of its
proven-equal class makes the two sympy expressions equal, or when the graph's shape environment
already knows it (``statically_known_true``).
"""

from __future__ import annotations

import itertools
import operator

import sympy
import torch
from torch import fx

from ..graph_utils import _expr, fake_value, same_size

aten = torch.ops.aten

#: How many nodes one proof may value-number before it gives up (then: not proven).
_MAX_NODES = 4000
#: Ops whose result is not a function of their inputs' values (uninitialised memory).
_UNINITIALISED = {aten.empty, aten.empty_like, aten.new_empty, aten.empty_strided, aten.new_empty_strided}
_NONDETERMINISTIC_TAGS = (torch.Tag.nondeterministic_seeded, torch.Tag.nondeterministic_bitwise)


class _Unproven(Exception):
    """The value-numbering budget ran out: whatever was being proven is not proven."""


def _packet(target):
    return getattr(target, "overloadpacket", None)


def _normal_dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else dim


class SizeProver:
    """Decides size equalities for the nodes of one graph (build one per comparison; it caches as it goes)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self._keys: dict[fx.Node, object] = {}
        self._mutated: set[fx.Node] | None = None
        self._definitions: dict[sympy.Symbol, tuple[fx.Node, tuple]] | None = None
        self._size_keys: dict[sympy.Symbol, object] = {}
        self._visited = 0
        self._unique = itertools.count()

    # ----------------------------------------------------------------- sizes
    def same_size(self, a, b) -> bool:
        """``a == b`` for two sizes (ints, SymInts or sympy expressions) of this graph, when provable."""
        if same_size(a, b):
            return True
        if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
            from torch.fx.experimental.symbolic_shapes import statically_known_true

            try:
                if statically_known_true(a == b):
                    return True
            except Exception:  # noqa: BLE001 - a shape env that cannot decide proves nothing
                pass
        ea, eb = _expr(a), _expr(b)
        if not isinstance(ea, sympy.Basic) and not isinstance(eb, sympy.Basic):
            return False
        ea, eb = sympy.sympify(ea), sympy.sympify(eb)
        substitution = self._representatives(ea.free_symbols | eb.free_symbols)
        if not substitution:
            return False
        return same_size(ea.xreplace(substitution), eb.xreplace(substitution))

    def same_shape(self, a, b) -> bool:
        return len(a) == len(b) and all(self.same_size(x, y) for x, y in zip(a, b))

    def same_argument(self, a: object, b: object) -> bool:
        """Two top-k style scalar arguments: SymInt nodes or plain values."""
        if isinstance(a, fx.Node) and a is b:
            return True
        va = fake_value(a) if isinstance(a, fx.Node) else a
        vb = fake_value(b) if isinstance(b, fx.Node) else b
        if va is None or vb is None:
            return False
        return self.same_size(va, vb)

    def unproven(self, a, b) -> str:
        """Why ``a == b`` is not proven: the data-dependent sizes or the separate input sizes involved ('' if none)."""
        symbols: set = set()
        for size in (a, b):
            expr = _expr(size)
            if isinstance(expr, sympy.Basic):
                symbols |= expr.free_symbols
        unbacked = sorted((s for s in symbols if self._definition(s) is not None), key=str)
        if unbacked:
            named = ", ".join(f"{s} ({self._definition(s)[0].name})" for s in unbacked)
            return (
                f"the data-dependent sizes {named} count entries of values not proven equal "
                "(they derive from different graph inputs, such as each layer's own cache)"
            )
        inputs = {}
        for size in (a, b):
            env = size.node.shape_env if isinstance(size, torch.SymInt) else None
            for symbol in sorted(_expr(size).free_symbols, key=str) if env is not None else ():
                sources = env.var_to_sources.get(symbol) or []
                inputs.setdefault(symbol, sources[0].name if sources else "a graph input")
        if len(inputs) < 2:
            return ""
        named = ", ".join(f"{symbol} = {source}" for symbol, source in inputs.items())
        return f"they are computed from separate input sizes ({named}) that nothing in the graph ties together"

    def _representatives(self, symbols: set) -> dict:
        """Each unbacked symbol among ``symbols`` mapped to the first one proven equal to it."""
        unbacked = sorted((s for s in symbols if self._definition(s) is not None), key=str)
        classes: list[tuple[sympy.Symbol, object]] = []
        substitution = {}
        for symbol in unbacked:
            key = self._size_key(symbol)
            if key is None:
                continue
            for representative, other in classes:
                if other == key:
                    substitution[symbol] = representative
                    break
            else:
                classes.append((symbol, key))
        return substitution

    def _definition(self, symbol) -> tuple[fx.Node, tuple] | None:
        if self._definitions is None:
            self._definitions = {}
            for node in self.graph.nodes:
                for bound, path in (node.meta.get("unbacked_bindings") or {}).items():
                    self._definitions.setdefault(bound, (node, tuple(path)))
                    resolved = _resolve(fake_value(node), path)
                    if isinstance(resolved, sympy.Symbol):
                        self._definitions.setdefault(resolved, (node, tuple(path)))
        return self._definitions.get(symbol)

    def _size_key(self, symbol) -> object | None:
        """What the symbol's value is a function of, or None when that cannot be told."""
        if symbol in self._size_keys:
            return self._size_keys[symbol]
        node, path = self._definition(symbol)
        try:
            key = self._defining_key(node, path)
        except _Unproven:
            key = None
        self._size_keys[symbol] = key
        return key

    def _defining_key(self, node: fx.Node, path: tuple) -> object:
        target = _packet(node.target)
        where = tuple(repr(p) for p in path)
        if target is aten.index and len(node.args) > 1:
            data = fake_value(node.args[0])
            masks = []
            for index in node.args[1]:
                value = fake_value(index) if isinstance(index, fx.Node) else None
                if value is not None and value.dtype == torch.bool:
                    masks.append(self.key(index))  # the count of True entries: the mask's value decides
                elif index is None:
                    masks.append(None)
                else:
                    masks.append(("shape", tuple(str(_expr(s)) for s in value.shape) if value is not None else None))
            shape = tuple(str(_expr(s)) for s in data.shape) if data is not None else None
            return ("index", tuple(masks), shape, where)
        if target in (aten.nonzero, aten.masked_select):
            return (str(target), tuple(self.key(a) if isinstance(a, fx.Node) else a for a in node.args), where)
        return ("op", self.key(node), where)

    # ----------------------------------------------------------------- values
    def key(self, node: fx.Node) -> object:
        """A hashable value number: equal keys mean equal values at run time."""
        try:
            return self._key(node)
        except RecursionError:
            raise _Unproven from None

    def _fresh(self) -> object:
        return ("distinct", next(self._unique))

    def _key(self, node: fx.Node) -> object:
        node = self._forward(node)
        if node in self._keys:
            return self._keys[node]
        self._visited += 1
        if self._visited > _MAX_NODES:
            raise _Unproven
        if node in self._mutated_nodes():
            return self._fresh()  # read before or after a write: never the same value as anything
        if node.op in ("placeholder", "get_attr") or node.op != "call_function" or not self._deterministic(node):
            key = ("node", id(node))
        elif _packet(node.target) is aten.select and self._static_select(node) is not None:
            part, dim, index = self._static_select(node)
            key = ("select", self._key(part), dim, index)
        else:
            key = (str(node.target), self._arg_key(node.args), self._arg_key(tuple(sorted(node.kwargs.items()))))
        self._keys[node] = key
        return key

    def _arg_key(self, arg):
        if isinstance(arg, fx.Node):
            return self._key(arg)
        if isinstance(arg, (list, tuple)):
            return (type(arg).__name__, tuple(self._arg_key(a) for a in arg))
        if isinstance(arg, float) and arg != arg:
            return ("nan",)
        return (type(arg).__name__, repr(arg))

    @staticmethod
    def _deterministic(node: fx.Node) -> bool:
        target = node.target
        if node.is_impure() or _packet(target) in _UNINITIALISED:
            return False
        tags = getattr(target, "tags", ())
        return not any(tag in tags for tag in _NONDETERMINISTIC_TAGS)

    def _mutated_nodes(self) -> set[fx.Node]:
        """Nodes some op writes in place (their reads are not one value)."""
        if self._mutated is None:
            self._mutated = set()
            for node in self.graph.nodes:
                schema = getattr(node.target, "_schema", None)
                if node.op != "call_function" or schema is None:
                    continue
                for position, argument in enumerate(schema.arguments):
                    written = argument.alias_info is not None and argument.alias_info.is_write
                    value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
                    if written and isinstance(value, fx.Node):
                        self._mutated.add(value)
        return self._mutated

    # ----------------------------------------------------------------- identities
    def _forward(self, node: fx.Node) -> fx.Node:
        """The node ``node`` is an exact copy of, through the identities in the module docstring."""
        for _ in range(64):
            nxt = self._identity(node)
            if nxt is None:
                return node
            node = nxt
        return node

    def _identity(self, node: fx.Node) -> fx.Node | None:
        if node.op != "call_function":
            return None
        target = _packet(node.target)
        if target is aten.cat:
            parts = self._cat_parts(node)
            if parts is not None and len(parts[0]) == 1:
                (only,) = parts[0]
                mine, theirs = fake_value(node), fake_value(only)
                if mine is not None and theirs is not None and mine.dtype == theirs.dtype and same_size(
                    mine.numel(), theirs.numel()
                ) and len(mine.shape) == len(theirs.shape):
                    return only
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            split = node.args[0]
            if _packet(split.target) in (aten.split_with_sizes, aten.split) and split.op == "call_function":
                return self._split_of_cat(split, node.args[1])
        return None

    def _cat_parts(self, node: fx.Node) -> tuple[list[fx.Node], int] | None:
        """A cat's operands, legacy empty 1-D operands dropped, and its normalised dim."""
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        value = fake_value(node)
        if value is None or not isinstance(dim, int):
            return None
        parts = []
        for part in tensors:
            part_value = fake_value(part) if isinstance(part, fx.Node) else None
            if part_value is None:
                return None
            if part_value.dim() == 1 and same_size(part_value.shape[0], 0) and value.dim() != 1:
                continue  # torch.cat skips legacy empty tensors of shape (0,)
            parts.append(part)
        return parts, _normal_dim(dim, value.dim())

    def _split_of_cat(self, split: fx.Node, index: int) -> fx.Node | None:
        source = self._forward(split.args[0])
        if source.op != "call_function" or _packet(source.target) is not aten.cat:
            return None
        found = self._cat_parts(source)
        sizes = split.args[1]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if found is None or not isinstance(sizes, (list, tuple)) or not isinstance(dim, int):
            return None
        parts, cat_dim = found
        value = fake_value(source)
        if _normal_dim(dim, value.dim()) != cat_dim or len(parts) != len(sizes):
            return None
        if not all(same_size(fake_value(p).shape[cat_dim], s) for p, s in zip(parts, sizes)):
            return None
        return parts[index]

    def _static_select(self, node: fx.Node) -> tuple[fx.Node, int, int] | None:
        """``select(x, d, i)`` as (source, normalised d, normalised i); inside one operand when x is a cat on d."""
        source = self._forward(node.args[0])
        dim, index = node.args[1], node.args[2]
        value = fake_value(source)
        if value is None or not isinstance(dim, int) or not isinstance(index, int):
            return None
        dim = _normal_dim(dim, value.dim())
        width = value.shape[dim]
        if not isinstance(width, int) or not -width <= index < width:
            return None
        found = self._cat_parts(source) if source.op == "call_function" and _packet(source.target) is aten.cat else None
        if found is None or found[1] != dim:
            return source, dim, index % width
        parts, cat_dim = found
        widths = [fake_value(p).shape[cat_dim] for p in parts]
        if any(not isinstance(w, int) for w in widths):
            return None
        total = sum(widths)
        row = index % total if -total <= index < total else None
        if row is None:
            return None
        for part, width in zip(parts, widths):
            if row < width:
                return part, cat_dim, row
            row -= width
        return None


def _resolve(value, path):
    """Apply an unbacked binding's key path (``.size()[1]``, ...) to a fake value; the sympy expr or None."""
    try:
        for step in path:
            name = getattr(step, "name", None)
            if name is not None:
                value = getattr(value, name)()
            elif hasattr(step, "idx"):
                value = value[step.idx]
            else:
                return None
        return _expr(value)
    except Exception:  # noqa: BLE001 - an unreadable path defines nothing
        return None
