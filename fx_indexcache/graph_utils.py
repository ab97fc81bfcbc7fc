"""Small FX helpers shared by every stage: op classes, ReLU, symbolic size equality, dead-cone removal."""

from __future__ import annotations

import contextlib

import operator
from collections.abc import Iterable

import sympy
import torch
from torch import fx

from .composite_ops import decomposes_into, op_name

aten = torch.ops.aten

#: Ops that multiply two operands and reduce over a shared axis. Composite ones an export keeps whole
#: (``linear``, ``tensordot``) are contractions by their definition (``is_call``).
CONTRACTIONS = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.matmul, aten.einsum, aten._scaled_mm}

#: Ops that keep every value of one tensor, by how they move it (fusion replays each kind on index labels).
RESHAPES = {aten.view, aten.reshape, aten._unsafe_view, aten.squeeze, aten.unsqueeze, aten.flatten}
PERMUTES = {aten.permute, aten.transpose, aten.t}
IDENTITIES = {aten.clone, aten.contiguous, aten.alias, aten.lift_fresh_copy}
CASTS = {torch.ops.prims.convert_element_type, aten._to_copy}
EXPANDS = {aten.expand}
VALUE_PRESERVING = RESHAPES | PERMUTES | IDENTITIES | CASTS | EXPANDS

#: Ops that only re-view, re-type, copy or pick part of one tensor: they carry a weight through unchanged.
VIEW_LIKE = VALUE_PRESERVING | {aten.slice, aten.select}

_RELU = {aten.relu, aten.relu_}

#: What a composite op may run besides the op it stands for (a view or cast on the way in or out).
_GLUE = frozenset(op_name(op) for op in VALUE_PRESERVING)
_CONTRACTION_NAMES = frozenset(op_name(op) for op in CONTRACTIONS)


def packet(node: fx.Node):
    """The overload packet of an ATen call (``aten.mm`` for ``aten.mm.default``), else the target."""
    return getattr(node.target, "_overloadpacket", node.target)


def is_call(node: fx.Node, ops: Iterable) -> bool:
    """Whether ``node`` calls one of ``ops``.

    A composite op (``composite_ops``: one an export keeps whole) is read by its definition, in one of two classes
    whose readers take only its tensor inputs: one that only re-views, casts or copies its input (``to``,
    ``movedim``, ``numpy_T``) is each value-preserving op it runs; one that runs contractions besides those
    (``tensordot``, ``linear``) is a contraction (to a caller asking for all of ``CONTRACTIONS``), its first two
    inputs the operands. Any other composite op matches nothing, so a proof that needs it to be one of ``ops``
    does not go through and the indexer behind it is left alone.
    """
    if node.op != "call_function":
        return False
    if packet(node) in ops:
        return True
    parts = decomposes_into(node)
    if not parts:
        return False
    names = {op_name(op) for op in ops}
    beyond_glue = set(parts) - _GLUE
    if not beyond_glue:
        return any(part in names for part in parts)
    # A contraction only to a caller asking for any contraction: one asking for addmm reads addmm's arguments,
    # and linear(input, weight, bias), which runs an addmm, does not have them.
    operands = node.args[:2]
    return (beyond_glue <= _CONTRACTION_NAMES and _CONTRACTION_NAMES <= names
            and len(operands) == 2 and all(isinstance(arg, fx.Node) for arg in operands))


def is_relu(node: fx.Node) -> bool:
    """Whether ``node`` computes ``max(x, 0)`` of one tensor ``x`` (``relu_input`` names it)."""
    return relu_input(node) is not None


def relu_input(node: fx.Node) -> "fx.Node | None":
    """``x`` where ``node`` computes ``max(x, 0)`` elementwise in x's shape and dtype, else None: ``relu(x)``,
    ``clamp_min(x, 0)``, ``clamp(x, min=0)`` without a max (a max makes it another activation), or
    ``maximum(x, Z)`` either way round with ``Z`` a tensor of zeros that neither widens x's shape nor its dtype
    (so the result is x's ReLU, not a broadcast or a promotion of it), or a select between x and zero by x's sign
    (``_sign_select_input``). Detection and fusion both ask here, so they agree on what a ReLU is."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if is_call(node, _RELU):
        return node.args[0]
    if is_call(node, {aten.clamp_min}):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        return node.args[0] if _is_zero(low) else None
    if is_call(node, {aten.clamp}):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
        return node.args[0] if _is_zero(low) and high is None else None
    if is_call(node, {aten.maximum}) and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        for x, zeros in (node.args, node.args[::-1]):
            if _is_zeros_tensor(zeros) and _same_shape_and_dtype(node, x):
                return x
    return _sign_select_input(node)


def _sign_select_input(node: fx.Node) -> "fx.Node | None":
    """``x`` where ``node`` keeps x where x > 0 and zero where x < 0, in x's shape and dtype: the one class that
    ``where(x > 0, x, 0)``, ``where(x < 0, 0, x)``, ``x.masked_fill(x < 0, 0)``, ``x * (x > 0)`` and
    ``threshold(x, 0, 0)`` belong to, with ``>=``/``<=`` alike (at x = 0 both branches are zero) and the zero a
    number or a tensor of zeros. Each equals ``relu(x)`` for every finite x; at NaN a select gives 0 where relu
    gives NaN, which no top-k of a finite score meets."""
    args = node.args
    if is_call(node, {aten.where}) and len(args) == 3:
        predicate, kept, other = args
        for x, zero, sign in ((kept, other, _POSITIVE), (other, kept, _NEGATIVE)):
            if _is_zero_value(zero) and _sign_test(predicate, x) == sign and _same_shape_and_dtype(node, x):
                return x
    if is_call(node, {aten.masked_fill}) and len(args) == 3:
        x, predicate, value = args
        if _is_zero_value(value) and _sign_test(predicate, x) == _NEGATIVE and _same_shape_and_dtype(node, x):
            return x
    if is_call(node, {aten.mul}) and len(args) == 2:
        for x, predicate in (args, args[::-1]):
            # (x > 0).to(x.dtype) is the same predicate; a cast that widens x is caught by the dtype check
            while isinstance(predicate, fx.Node) and is_call(predicate, CASTS):
                predicate = predicate.args[0]
            if _sign_test(predicate, x) == _POSITIVE and _same_shape_and_dtype(node, x):
                return x
    if is_call(node, {aten.threshold}) and len(args) == 3 and _is_zero(args[1]) and _is_zero(args[2]):
        return args[0] if _same_shape_and_dtype(node, args[0]) else None
    return None


_POSITIVE, _NEGATIVE = "true where x > 0", "true where x < 0"

#: Comparisons with zero, by which sign of ``x`` makes them true when ``x`` is their first operand.
_SIGN_TESTS = {aten.gt: _POSITIVE, aten.ge: _POSITIVE, aten.lt: _NEGATIVE, aten.le: _NEGATIVE}


def _sign_test(predicate, x) -> "str | None":
    """``_POSITIVE`` or ``_NEGATIVE`` where ``predicate`` compares the tensor ``x`` itself with zero (either operand
    order), else None."""
    if not isinstance(predicate, fx.Node) or not isinstance(x, fx.Node) or len(predicate.args) != 2:
        return None
    sign = next((s for op, s in _SIGN_TESTS.items() if is_call(predicate, {op})), None)
    first, second = predicate.args
    if sign is None or x not in (first, second):
        return None
    if first is x:
        return sign if _is_zero_value(second) else None
    flipped = _NEGATIVE if sign == _POSITIVE else _POSITIVE  # 0 < x is x > 0
    return flipped if _is_zero_value(first) else None


def _is_zero_value(value) -> bool:
    """The number 0 or a tensor of zeros the graph holds."""
    return _is_zero(value) or (isinstance(value, fx.Node) and _is_zeros_tensor(value))


#: Ops that make a tensor of one value, and where that value is among their arguments (None: zero by name).
_FILLS = {aten.zeros: None, aten.zeros_like: None, aten.new_zeros: None, aten.full: 1, aten.full_like: 1,
          aten.new_full: 2, aten.scalar_tensor: 0}


def _is_zeros_tensor(node: fx.Node) -> bool:
    """``node`` is a tensor of zeros the graph holds, re-viewed or expanded at most: a fill op whose value is the
    constant 0, or a constant of the graph's module (``torch.tensor(0.)`` in the model) whose values are all 0."""
    while is_call(node, RESHAPES | EXPANDS | IDENTITIES | PERMUTES) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if node.op == "get_attr":
        return _is_zero_constant(node)
    for op, at in _FILLS.items():
        if is_call(node, {op}):
            return at is None or (len(node.args) > at and _is_zero(node.args[at]))
    return False


#: The largest graph constant whose values ``_is_zero_constant`` reads (a scalar or a short vector in practice).
_MAX_CONSTANT_READ = 1 << 16


def _is_zero_constant(node: fx.Node) -> bool:
    """A ``get_attr`` of a real (not fake) tensor on the graph's module, small enough to read, all of whose values
    are 0: the value the graph runs with, since a lifted constant is copied before any use."""
    from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

    value = node.graph.owning_module
    try:
        for part in str(node.target).split("."):
            value = getattr(value, part)
    except AttributeError:
        return False
    if not isinstance(value, torch.Tensor) or is_fake(value) or value.device.type == "meta":
        return False
    with unset_fake_temporarily():  # (passes run under the compile's fake mode; this value is real)
        return value.numel() <= _MAX_CONSTANT_READ and not bool(value.any())


def _is_zero(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _same_shape_and_dtype(node: fx.Node, x: fx.Node) -> bool:
    out, val = fake_value(node), fake_value(x)
    if not isinstance(out, torch.Tensor) or not isinstance(val, torch.Tensor):
        return False
    return out.dtype == val.dtype and len(out.shape) == len(val.shape) and all(
        same_size(a, b) for a, b in zip(out.shape, val.shape))


def getitem_users(node: fx.Node, index: int) -> list[fx.Node]:
    """The ``getitem(node, index)`` nodes that read output ``index`` of a multi-output node."""
    return [u for u in node.users if u.target is operator.getitem and u.args[1] == index]


class CallWalk:
    """A bounded walk over call nodes, each visited once: iterate it for the nodes in turn, and ``extend`` it with the
    nodes to go on to (a walk up a score adds inputs). Stops after ``limit`` visits; ``finished`` says whether it
    reached every node it was given (False: it ran out of visits first)."""

    def __init__(self, starts: Iterable[fx.Node], limit: int) -> None:
        self.frontier = list(starts)
        self.seen: set[fx.Node] = set()
        self.limit = limit

    def __iter__(self):
        while self.frontier and len(self.seen) < self.limit:
            node = self.frontier.pop()
            if not isinstance(node, fx.Node) or node in self.seen or node.op != "call_function":
                continue
            self.seen.add(node)
            yield node

    def extend(self, nodes: Iterable[fx.Node]) -> None:
        self.frontier.extend(nodes)

    @property
    def finished(self) -> bool:
        return not self.frontier


def call_arguments(node: fx.Node, positional: tuple[str, ...], defaults: dict) -> dict:
    """A call's arguments by name: ``positional`` names its positional ones in order, keyword ones overlay them,
    ``defaults`` fills what neither gives (an op's schema defaults the graph leaves out)."""
    values = dict(defaults)
    values.update(zip(positional, node.args))
    values.update(node.kwargs)
    return values


def fake_value(node: fx.Node):
    return node.meta.get("val", node.meta.get("example_value"))


def fake_mode_of(values):
    """The fake mode ``values`` (nodes' fake values) live in: a context for computing a new node's value like theirs;
    a no-op context where there is none."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode(list(values)) or contextlib.nullcontext()


def _expr(size):
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return size


def same_size(a, b) -> bool:
    """Equality of two sizes that may be symbolic: the same int, or expressions whose difference is 0."""
    a, b = _expr(a), _expr(b)
    try:
        if bool(a == b):
            return True
        if isinstance(a, int) and isinstance(b, int):
            return False
        return bool(sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0)
    except (TypeError, ValueError, sympy.SympifyError):
        return False


def same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def size_hint(size) -> int:
    """A concrete value for a possibly symbolic size: its hint from the traced example."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        if hint is None:  # an unbacked size: torch renamed hint_int to optimization_hint (2.12)
            from torch.fx.experimental import symbolic_shapes

            estimate = getattr(symbolic_shapes, "optimization_hint", None) or symbolic_shapes.hint_int
            return int(estimate(size, fallback=1))
        return int(hint)
    return int(size)


def numel_hint(shape) -> int:
    total = 1
    for size in shape:
        total *= size_hint(size)
    return total


def node_order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


def comes_after(a: fx.Node, b: fx.Node) -> bool:
    """Whether ``a`` stands after ``b`` in their graph: O(1) with FX's sort keys, else a scan."""
    try:
        return bool(a > b)
    except TypeError:  # a torch whose nodes do not compare
        order = node_order(a.graph)
        return order[a] > order[b]


def dead_if_removed(roots: Iterable[fx.Node]) -> set[fx.Node]:
    """The nodes that become dead code once ``roots`` lose all their users.

    Walks up from ``roots``: an input joins when every one of its users is already in the set
    and it is pure (mutations and placeholders never join).
    """
    dead = set(roots)
    frontier = list(dead)
    while frontier:
        node = frontier.pop()
        for arg in node.all_input_nodes:
            if arg in dead or arg.op != "call_function" or arg.is_impure():
                continue
            if all(user in dead for user in arg.users):
                dead.add(arg)
                frontier.append(arg)
    return dead


def erase_dead(graph: fx.Graph, dead: Iterable[fx.Node]) -> None:
    """Erase a dead cone (as ``dead_if_removed`` gives it) users first; a node still read stays.

    Ordered by FX's per-node sort keys where torch has them, so erasing stays linear in the cone.
    """
    dead = list(dead)
    try:
        position = {node: node._sort_key for node in dead}
    except AttributeError:  # a torch without sort keys
        order = node_order(graph)
        position = {node: order[node] for node in dead}
    for node in sorted(dead, key=position.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)


def copy_graph_module(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy whose graph can be edited without touching ``module``'s (node metadata shared, not copied)."""
    graph = torch.fx.Graph()
    output, old_output = graph.graph_copy(module.graph, {}, return_output_node=True)
    graph.output(output, type_expr=getattr(old_output, "type", None)).meta = dict(old_output.meta)
    return torch.fx.GraphModule(module, graph)


@contextlib.contextmanager
def insertions_undone_on_error(graph: fx.Graph):
    """Nodes the block inserts into ``graph`` are erased again if it raises: the graph is left as it was."""
    before = set(graph.nodes)
    try:
        yield
    except Exception:
        for node in reversed([n for n in graph.nodes if n not in before]):
            graph.erase_node(node)
        raise


def take_provenance(node: fx.Node, origin: fx.Node) -> None:
    """``node`` reports ``origin``'s source line and module path (what a replacement inherits from the original)."""
    node.meta["stack_trace"] = origin.meta.get("stack_trace")
    if "nn_module_stack" in origin.meta:
        node.meta["nn_module_stack"] = origin.meta["nn_module_stack"]
