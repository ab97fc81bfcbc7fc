"""What a composite ATen op is made of, so that every stage reads one dialect whatever produced the graph.

Compiled graphs reach the pass after AOTAutograd has decomposed every ``CompositeImplicitAutograd`` op
(``aten.to``, ``movedim``, ``tensordot``, ``numpy_T``, ``linear``, ...) into the ops it is defined by.
``torch.export``'s graphs keep many of them whole. A stage that asks "is this node a permute?" or "is this a
contraction?" by op name would then see an unknown op where a compiled graph of the same model holds a permute or
an ``mm``, and leave the indexer alone. Listing those ops one by one is a race with the exporter; reading them by
their own definition is not.

``decomposes_into(node)`` traces the op's composite kernel once, on meta tensors shaped like the node's inputs,
and names the ops it runs (an identity, such as ``to`` of a tensor's own dtype, runs ``aten.alias``). The answer
is kept in the node's ``meta`` under ``META_KEY``: the graph owns it, and it goes with the node.
``graph_utils.is_call`` asks a composite node whether it is one of the ops a stage names, up to re-views.
"""

from __future__ import annotations

import functools

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_map

#: The node-meta key under which a composite node's decomposition (op names, sorted) is kept.
META_KEY = "fx_indexcache_decomposes_into"

_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
_IDENTITY = ("aten::alias",)


@functools.lru_cache(maxsize=None)
def is_composite(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` is defined by other ops (compiled graphs never hold it; an export may)."""
    return op.has_kernel_for_dispatch_key(_COMPOSITE)


def op_name(op) -> str:
    """``aten::permute`` for the packet ``aten.permute`` or any of its overloads; ``str(op)`` for others."""
    packet = getattr(op, "_overloadpacket", op)
    return getattr(packet, "_qualified_op_name", str(packet))


def decomposes_into(node: fx.Node) -> tuple[str, ...] | None:
    """The names of the ops ``node``'s composite op runs on its inputs, or None: not a composite ATen call with one
    tensor out (``sym_size`` is composite too, and a size is no re-view of its tensor), or its inputs' values are
    unknown, or its kernel could not be traced (then no stage reads it as anything)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not is_composite(target):
        return None
    if META_KEY not in node.meta:
        node.meta[META_KEY] = _trace(node, target, _memo(node.graph))
    return node.meta[META_KEY]


def _memo(graph: fx.Graph) -> dict:
    """The graph's own table of traced signatures: a 61-layer export repeats each layer's composites, and a trace
    costs milliseconds. It lives and dies with the graph."""
    return graph.__dict__.setdefault(_MEMO_ATTRIBUTE, {})


_MEMO_ATTRIBUTE = "_fx_indexcache_composite_traces"


def _signature(leaves) -> tuple | None:
    """What the trace depends on: each tensor's shape and dtype, every other argument as it is (None: unhashable)."""
    key = tuple(("tensor", tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else leaf
                for leaf in leaves)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _trace(node: fx.Node, op: torch._ops.OpOverload, memo: dict) -> tuple[str, ...] | None:
    from .graph_utils import fake_value, size_hint  # graph_utils imports this module: is_call reads composites

    def concrete(arg):
        """A meta tensor for a tensor input (size hints for symbolic sizes), a hint for a size, else as it is."""
        if isinstance(arg, fx.Node):
            value = fake_value(arg)
            if isinstance(value, torch.Tensor):
                return torch.empty([size_hint(size) for size in value.shape], dtype=value.dtype, device="meta")
            if isinstance(value, (int, float, bool, torch.SymInt, torch.SymFloat)):
                return size_hint(value) if isinstance(value, torch.SymInt) else value
            raise ValueError(f"{arg} holds no value to trace with")
        return size_hint(arg) if isinstance(arg, torch.SymInt) else arg

    if not isinstance(fake_value(node), torch.Tensor):
        return None
    try:
        args, kwargs = tree_map(concrete, (node.args, node.kwargs))
        tensors, spec = tree_flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(tensors) if isinstance(leaf, torch.Tensor)]
        signature = _signature(tensors)
        key = None if signature is None else (op, str(spec), signature)
        if key is not None and key in memo:
            return memo[key]

        def run(*inputs):
            leaves = list(tensors)
            for i, tensor in zip(positions, inputs):
                leaves[i] = tensor
            call_args, call_kwargs = spec.unflatten(leaves)
            return op.decompose(*call_args, **call_kwargs)

        with unset_fake_temporarily():  # a post-grad pass runs under the compile's fake mode; these are meta
            graph = make_fx(run, tracing_mode="real")(*[tensors[i] for i in positions]).graph
    except Exception:  # a kernel that meta tensors cannot run: the op stays unknown, which is safe
        return None
    names = tuple(sorted({op_name(n.target) for n in graph.nodes
                          if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)})) or _IDENTITY
    if key is not None:
        memo[key] = names
    return names
