"""Products Inductor padded for alignment, restored before the detector reads a score.

On CUDA, Inductor's ``pad_mm`` (a joint-graph pass, on by default with ``shape_padding``) may replace
``mm(a, b)`` / ``bmm(a, b)`` by ``slice(mm(constant_pad_nd(a), constant_pad_nd(b)))``: zeros appended to reach an
aligned size, cut off again from the result. Whether it does is decided by timing the two forms on the card and
cached in Inductor's local cache, so the same model compiles to either form from one process to the next. The
score of an indexer is a product (q·k, then the per-head weighted sum), and the padded form hides it: its key axis
is the padded length, and every walker that reads a score (the finders, the fused kernel's matcher, the proofs)
would have to know the form.

So the form is undone once, before anything reads the graph: a padded product that feeds a selection's score
(a top-k, sort or argsort: the weighted sum over heads, and q·k under its ReLU) becomes the plain product again.
That is value-preserving: the rows and columns padding appended are the ones the slices drop, and padding along
the summed axis appends zeros to both operands, which add nothing. Products elsewhere keep Inductor's choice.

A padded product is restored only when the whole form is there: zero right-padding only, slices from 0 with step
1, a result of exactly the unpadded product's shape, and no other reader of the padded intermediates. Anything
else is left as it is, and a selection it hides stays unread (``hidden.py`` then keeps its layer out of sharing).
"""

from __future__ import annotations

import torch
from torch import fx
from torch._dynamo.utils import counters

from ..graph_utils import (
    CONTRACTIONS,
    call_arguments,
    dead_if_removed,
    erase_dead,
    fake_mode_of,
    fake_value,
    is_call,
    is_relu,
    same_shape,
    take_provenance,
)
from .topk import SELECTIONS, product_under_relu

aten = torch.ops.aten

#: The products ``pad_mm`` pads, by the position of their two operands' summed axis (``a``'s last, ``b``'s
#: second to last).
_PADDED_PRODUCTS = {aten.mm, aten.bmm}
_MAX_VISITS = 4000


def _pads(node: fx.Node) -> tuple[fx.Node, list[int]] | None:
    """``(x, right pad per dim)`` for ``constant_pad_nd(x, pad, 0)`` padding on the right only; ``(node, zeros)``
    for a node that is not a pad; None for any other padding."""
    value = fake_value(node)
    if value is None:
        return None
    if not is_call(node, {aten.constant_pad_nd}):
        return node, [0] * value.dim()
    args = call_arguments(node, ("input", "pad", "value"), {"value": 0})
    x, pad = args["input"], list(args["pad"])
    inner = fake_value(x) if isinstance(x, fx.Node) else None
    if inner is None or args["value"] != 0 or len(pad) % 2 or len(pad) > 2 * inner.dim():
        return None
    right = [0] * inner.dim()
    for i in range(len(pad) // 2):  # pairs from the last dim backwards: (left, right)
        left, extra = pad[2 * i], pad[2 * i + 1]
        if not isinstance(left, int) or not isinstance(extra, int) or left != 0 or extra < 0:
            return None
        right[inner.dim() - 1 - i] = extra
    return x, right


def _sliced_product(node: fx.Node) -> fx.Node | None:
    """The padded-product candidate under ``node`` when ``node`` is the last of slices from 0 with step 1 over it,
    each intermediate (the product too) read by nothing else; None otherwise."""
    current, depth = node, 0
    while is_call(current, {aten.slice}):
        args = call_arguments(current, ("input", "dim", "start", "end", "step"), {"start": None, "step": 1})
        if args["start"] not in (0, None) or args["step"] != 1 or (depth and len(current.users) != 1):
            return None
        current, depth = current.args[0], depth + 1
    if not depth or not is_call(current, _PADDED_PRODUCTS) or len(current.users) != 1:
        return None
    return current


def _restored(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(padded product, a, b)`` for the padded form ending at ``node``: the plain product is ``product(a, b)``."""
    product = _sliced_product(node)
    if product is None or len(product.args) != 2 or product.kwargs:
        return None
    padded = [_pads(arg) if isinstance(arg, fx.Node) else None for arg in product.args]
    if padded[0] is None or padded[1] is None:
        return None
    (a, a_pad), (b, b_pad) = padded
    if not any(a_pad) and not any(b_pad):
        return None
    if any(a_pad[:-2]) or any(b_pad[:-2]):  # bmm's batch axis is never padded
        return None
    a_value, b_value, out = fake_value(a), fake_value(b), fake_value(node)
    if a_value is None or b_value is None or out is None:
        return None
    if a_pad[-1] != b_pad[-2]:  # the summed axis padded alike on both sides
        return None
    expected = (*a_value.shape[:-1], b_value.shape[-1])
    if not same_shape(tuple(out.shape), expected):
        return None
    return product, a, b


def _form_over(product: fx.Node) -> fx.Node | None:
    """The last slice of the padded form ``product`` heads (its chain of sole-user slices), or None."""
    chain, node = [], product
    while len(node.users) == 1 and is_call(user := next(iter(node.users)), {aten.slice}):
        chain.append(node := user)
    return next((last for last in reversed(chain) if _restored(last) is not None), None)


def _score_cone_products(graph: fx.Graph) -> list[fx.Node]:
    """The last slice of each padded product a selection's score is read from, as the finders read it: the first
    product on each path up from the score (the weighted sum over heads, a router's gate, a pooled q·k), and the
    product under a ReLU at most one product up (q·k). Products further up (projections) keep their padding."""
    found: dict[fx.Node, None] = {}
    for selection in graph.nodes:
        if not is_call(selection, SELECTIONS) or not isinstance(selection.args[0], fx.Node):
            continue
        frontier, seen = [(selection.args[0], 0)], set()
        while frontier and len(seen) < _MAX_VISITS:
            node, crossed = frontier.pop()
            if (node, crossed) in seen or node.op != "call_function" or is_call(node, SELECTIONS):
                continue  # another selection's score is its own walk
            seen.add((node, crossed))
            if is_relu(node) and (product := product_under_relu(node)) is not None:
                if (last := _form_over(product)) is not None:
                    found[last] = None
            form = _restored(node)
            if form is not None or is_call(node, CONTRACTIONS):
                if crossed >= 1:
                    continue
                if form is not None:
                    found[node] = None
                    node = form[0]
                crossed += 1
            frontier.extend((arg, crossed) for arg in node.all_input_nodes)
    return list(found)


def restore_padded_products(graph: fx.Graph) -> int:
    """Undo Inductor's alignment padding on the products that feed a selection's score (module docstring);
    returns how many were restored."""
    restored = 0
    for last in _score_cone_products(graph):
        form = _restored(last)
        if form is None:  # an earlier restore in this graph changed it
            continue
        product, a, b = form
        with graph.inserting_before(last):
            plain = graph.call_function(product.target, (a, b))
        plain.meta = {key: value for key, value in product.meta.items() if key != "val"}
        take_provenance(plain, product)
        with fake_mode_of([fake_value(a), fake_value(b)]):
            plain.meta["val"] = product.target(fake_value(a), fake_value(b))
        last.replace_all_uses_with(plain)
        erase_dead(graph, dead_if_removed([last]))  # the slices, the padded product, its pads
        restored += 1
    if restored:
        counters["fx_indexcache"]["padded_products_restored"] += restored
    return restored
