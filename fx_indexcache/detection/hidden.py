"""Selections the detector cannot read: indexers a graph holds where no site finder looks.

The pass decides an S layer's source from the indexed layers it sees: a layer with no site is taken as one without
an indexer (a dense or sliding layer, which the engines' one-buffer rule skips). That inference is only sound when
every selection of the layer is visible. Two kinds of node hide one:

* a higher-order op whose subgraph (``torch.cond``'s branches, ``while_loop``, ``map``, export's
  ``wrap_with_set_grad_enabled`` / ``wrap_with_autocast``, ``invoke_subgraph``, ...) holds a top-k or sort that a
  finder examines, or holds a node of the second kind; the subgraphs are read recursively;
* an opaque op (not ATen or prims; this package's fused F-layer ops too, which a second application does not read
  as sites) or a higher-order op without a subgraph (a user's Triton
  kernel, ``auto_functionalized`` custom ops) that outputs an int32 or int64 tensor: indices are integer tensors,
  and nothing says which ones such an op selects. Quantised caches (uint8, int8) and float outputs are not indices.

A top-k the finders rejected counts too when the rejection settles nothing: the verdict is undecided (keys of
unknown role, an indexer whose indices nobody reads), or its score comes, a few plain ops up and before any
contraction the detector sees, from a node of either kind above (a score computed inside ``wrap_with_autocast``,
an opaque logits kernel). Every other node a finder claimed (sites, routers it proved) is not hidden. A hidden selection makes its layer
one the pass can neither take indices from nor skip (``rewrite/share.py``); where its layer is not known, no S
layer after it in graph order takes a source before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch import fx
from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket
from torch.utils._pytree import tree_leaves

from ..graph_utils import CONTRACTIONS, CallWalk, is_call, op_name

#: Op namespaces whose every op the detector reads as what it is: a selection among them is a top-k or sort that
#: a finder examines.
READABLE_NAMESPACES = frozenset({"aten", "prims"})

#: Integer dtypes indices come in (``topk`` gives int64, the engines keep int32).
INDEX_DTYPES = frozenset({torch.int32, torch.int64})

#: How deep subgraphs are read (a subgraph inside a subgraph ...); deeper ones count as hidden.
MAX_DEPTH = 8

Finder = Callable[[fx.Graph], tuple[list, list]]


@dataclasses.dataclass
class HiddenSelection:
    """A node of the graph under which a selection may run that no site finder reads."""

    node: fx.Node
    what: str  # for reports: "a top-k inside the subgraph true_graph_0 of cond"
    subgraphs: tuple[str, ...] = ()  # the subgraphs it calls (empty for an opaque op)
    layer: int | None = None  # its decoder layer, when the node's module path places it
    remedy: str = ""  # what lets the pass see it, for reports


#: How many nodes up from a rejected top-k's score the walk looks for an opaque producer.
SCORE_WALK = 32


def hidden_selections(graph: fx.Graph, sites: list, ignored: list, find_all: Finder) -> list[HiddenSelection]:
    """Every node of ``graph`` (in order) that hides a selection: ``sites`` and ``ignored`` are the finders' answer
    on ``graph``, ``find_all`` runs them on a subgraph."""
    verdicts = {verdict.node: verdict for verdict in ignored}
    claimed = {node for site in sites for node in (site.anchor, site.indices)}
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node in claimed:
            continue
        verdict = verdicts.get(node)
        hidden = _hidden(node, graph, find_all, 0) if verdict is None else _unsettled(verdict)
        if hidden is not None:
            found.append(hidden)
    return found


def _unsettled(verdict) -> HiddenSelection | None:
    """A rejected top-k that may still be an indexer: scoring what an opaque node computed (said first: it names
    what hides the score), or undecided."""
    score = verdict.node.args[0] if verdict.node.args else None
    producer = _opaque_producer(score) if isinstance(score, fx.Node) else None
    if producer is not None:
        return HiddenSelection(verdict.node, f"a top-k of a score computed by {_opaque_label(producer)} "
                               f"({producer.name})", remedy=_REMEDIES.get(op_name(producer.target), _OPAQUE_REMEDY))
    if verdict.undecided:
        return HiddenSelection(verdict.node, f"a top-k the detector could not settle ({verdict.reason})",
                               remedy=verdict.remedy)
    return None


def _opaque_producer(score: fx.Node) -> fx.Node | None:
    """The first opaque or higher-order node a short walk up from ``score`` meets before any contraction."""
    walk = CallWalk([score], SCORE_WALK)
    for node in walk:
        if _opaque(node):
            return node
        if not is_call(node, CONTRACTIONS):
            walk.extend(node.all_input_nodes)
    return None


def _hidden(node: fx.Node, graph: fx.Graph, find_all: Finder, depth: int) -> HiddenSelection | None:
    subgraphs = list(_called_subgraphs(node, graph))
    if subgraphs:
        for name, module in subgraphs:
            inside = _selection_inside(module, find_all, depth + 1)
            if inside is not None:
                return HiddenSelection(node, f"{inside} inside the subgraph {name} of {_hop_name(node.target)}",
                                       tuple(name for name, _ in subgraphs),
                                       remedy=_REMEDIES.get(op_name(node.target), _CONTROL_FLOW_REMEDY))
        return None
    if _opaque(node) and any(_is_index_tensor(value) for value in _output_values(node)):
        return HiddenSelection(node, f"an opaque op {_opaque_label(node)} that outputs integer tensors",
                               remedy=_OPAQUE_REMEDY)
    return None


#: What users wrote, for the higher-order ops whose names do not say it.
_WRITTEN_AS = {"invoke_subgraph": "a nested_compile_region body", "wrap_with_set_grad_enabled": "a set_grad_enabled "
               "block (export)", "wrap_with_autocast": "an autocast block (export)", "cond": "torch.cond",
               "while_loop": "torch.while_loop", "map_impl": "torch.map", "tag_activation_checkpoint":
               "activation checkpointing"}


_OPAQUE_REMEDY = ("write the selection in torch ops, or register a site finder for the op "
                  "(fx_indexcache.register_site_finder)")
_CONTROL_FLOW_REMEDY = "the pass does not rewrite inside control flow: select outside the branch or loop"
_REMEDIES = {
    "wrap_with_set_grad_enabled": "export under torch.no_grad()",
    "wrap_with_autocast": "cast explicitly instead of an autocast block, or compile instead of exporting",
    "invoke_subgraph": "a body with one indexer gets F and S versions; compile whole layers otherwise",
    "tag_activation_checkpoint": "run under torch.no_grad() or torch.inference_mode()",
}


def _hop_name(target: object) -> str:
    label = op_name(target)
    written = _WRITTEN_AS.get(label)
    return label if written is None else f"{label} ({written})"


def _selection_inside(module: fx.GraphModule, find_all: Finder, depth: int) -> str | None:
    """What selection ``module``'s graph holds (its finders' top-k and sorts, or hidden nodes), or None."""
    if depth > MAX_DEPTH:
        return "a subgraph nested too deep to read"
    sites, ignored = find_all(module.graph)
    if sites:
        return f"{len(sites)} indexer top-k"
    if ignored:
        return f"a top-k ({ignored[0].node.name})"
    for node in module.graph.nodes:
        if node.op == "call_function":
            inner = _hidden(node, module.graph, find_all, depth)
            if inner is not None:
                return inner.what
    return None


def _called_subgraphs(node: fx.Node, graph: fx.Graph) -> Iterator[tuple[str, fx.GraphModule]]:
    owner = graph.owning_module
    if owner is None:
        return
    seen = set()
    for arg in tree_leaves((node.args, node.kwargs)):
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target not in seen:
            seen.add(arg.target)
            try:
                module = owner.get_submodule(str(arg.target))
            except AttributeError:  # a parameter or constant, not a subgraph
                continue
            if isinstance(module, fx.GraphModule):
                yield str(arg.target), module


def _inner_op(node: fx.Node) -> object:
    """The op a wrapper HOP calls (``auto_functionalized(op, ...)``, ``with_effects(token, op, ...)``), or the
    node's own target."""
    if isinstance(node.target, HigherOrderOperator):
        for arg in node.args[:2]:
            if isinstance(arg, (OpOverload, OpOverloadPacket)):
                return arg
    return node.target


def _opaque(node: fx.Node) -> bool:
    target = _inner_op(node)
    if isinstance(target, (OpOverload, OpOverloadPacket)):
        return target.namespace not in READABLE_NAMESPACES
    return isinstance(target, HigherOrderOperator)


def _opaque_label(node: fx.Node) -> str:
    inner = _inner_op(node)
    if inner is node.target:
        return op_name(node.target)
    return f"{op_name(inner)} (in {op_name(node.target)})"


def _output_values(node: fx.Node) -> Iterator[object]:
    meta = node.meta
    yield from tree_leaves(meta["val"] if "val" in meta else meta.get("example_value"))


def _is_index_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in INDEX_DTYPES and value.dim() >= 1
