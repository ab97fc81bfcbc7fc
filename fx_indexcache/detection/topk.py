"""Detect lightning-indexer top-k written in plain torch (``aten.topk`` in the graph).

A DSA graph holds other top-k too: MoE routers pick experts, samplers pick vocabulary
entries. What marks an indexer is its score, not its name: the top-k reduces the key axis of
``ReLU(q · kᵀ)``, a product of two activations (a router or sampler scores with a weight
matrix), reached from the top-k through at most one more contraction (the per-head weighted
sum). Module paths that say "indexer" are recorded as evidence but never admit a top-k the
structure rejects, so graphs traced without ``nn_module_stack`` (functional code, export) are
handled the same way as named ones.

A rejection is settled only where the score is read from one projection, a product with a weight, as a router's
gate or a sampler's head is. Any other top-k without a readable ReLU(q·k) over its axis (another activation, the
scores cut after the product, q·k as a broadcast multiply and sum) is undecided: it may be a layer's indexer, so
``hidden.py`` keeps its layer out of sharing.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import operator

import torch
from torch import fx

from ..graph_utils import (
    CONTRACTIONS,
    VIEW_LIKE,
    CallWalk,
    call_arguments,
    dead_if_removed,
    fake_value,
    getitem_users,
    is_call,
    is_relu,
    numel_hint,
    packet,
    relu_input,
    same_size,
)
from .graph_inputs import parameter_placeholders
from .layers import module_path, module_types
from .sites import CacheWrite, IndexerSite, TopkVerdict

aten = torch.ops.aten

#: Ops allowed between the q·k product and the ReLU (scaling, casting, re-viewing).
_SCORE_SCALING = VIEW_LIKE | {aten.mul, aten.div, aten.add}
#: Functional cache updates whose result is written back into a graph input by ``copy_``,
#: with the position of the argument that holds the written rows.
_CACHE_UPDATES = {aten.slice_scatter: 1, aten.select_scatter: 1, aten.index_put: 2, aten.index_copy: 3, aten.scatter: 3}
_MAX_VISITS = 4000
#: Ops that select keys (a score cone is never followed through another layer's selection).
SELECTIONS = {aten.topk, aten.sort, aten.argsort}


@dataclasses.dataclass(eq=False)
class TopkIndexerSite(IndexerSite):
    """An indexer whose indices are ``getitem(aten.topk(score, k, dim, ...), 1)``."""

    kind = "aten.topk"

    def refusal(self) -> str | None:
        if any(value.users for value in getitem_users(self.anchor, 0)):
            return "the top-k values are used too; sharing only the indices would change them"
        readers = getitem_users(self.anchor, 1)
        if len(readers) != 1:
            return f"the indices are read through {len(readers)} getitem nodes"
        return None

    def incompatibility(self, source: IndexerSite, sizes=None) -> str | None:
        sizes = sizes or self.sizes()
        reason = super().incompatibility(source, sizes)
        if reason is not None:
            return reason
        assert isinstance(source, TopkIndexerSite)
        _, k, dim, largest, ordered = topk_arguments(self.anchor)
        score = fake_value(self.anchor.args[0])
        _, k2, dim2, largest2, ordered2 = topk_arguments(source.anchor)
        score2 = fake_value(source.anchor.args[0])
        if not sizes.same_argument(k, k2):
            return f"k={k} differs from layer {source.layer}'s k={k2}"
        ndim = score.dim()
        if dim % ndim != dim2 % score2.dim() or largest != largest2 or ordered != ordered2:
            return f"top-k dim/largest/sorted differ from layer {source.layer}'s"
        return self.key_width_mismatch(source, sizes.same_size)

    def cache_writes(self) -> list[CacheWrite]:
        """Writes of our keys into a cache input that only our (now dead) scoring reads."""
        return cache_writes_feeding_only([self.anchor, *self.anchor.users])

    def key_axis(self) -> int:
        return topk_arguments(self.anchor)[2]


def cache_writes_feeding_only(roots: list[fx.Node]) -> list[CacheWrite]:
    """The cache writes (``copy_`` of a functional update into a cache input) that only ``roots``' cone reads.

    Those are the writes sharing drops with ``drop_shared_indexer_cache_writes``: once the roots are dead,
    nothing in the graph reads the rows written, only a later call would. A cache that anything else in the graph
    reads (another layer's indexer, before or after the write) keeps its writes: that reader reads it in later
    calls too.
    """
    dead = dead_if_removed(roots)
    writes = []
    for node in dead:
        for arg in node.all_input_nodes:
            if arg in dead or not is_call(arg, _CACHE_UPDATES):
                continue
            cache = arg.args[0]
            others = [u for u in arg.users if u not in dead]
            if cache.op != "placeholder" or len(others) != 1:
                continue
            (write,) = others
            if not (is_call(write, {aten.copy_}) and write.args[0] is cache and write.args[1] is arg):
                continue
            if not all(_only_feeds(user, dead | {arg, write}) for user in cache.users):
                continue  # something else reads the cache (another layer): its rows must stay complete
            value = fake_value(arg.args[_CACHE_UPDATES[packet(arg)]])
            nbytes = numel_hint(value.shape) * value.element_size() if value is not None else 0
            writes.append(CacheWrite(write=write, nbytes=nbytes))
    return writes


def _only_feeds(node: fx.Node, sinks: set[fx.Node]) -> bool:
    """Whether every path from ``node`` through its users ends in ``sinks`` (the write's own operands do). A pure
    node nothing reads is dead code (Inductor's post-grad graph keeps the view a functionalized ``keys[a:b] = v``
    took of the cache before writing it): it reads nothing that survives."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in sinks or current in seen:
            continue
        if not current.users:
            if current.op == "call_function" and not current.is_impure():
                continue
            return False
        seen.add(current)
        stack.extend(current.users)
    return True


def topk_arguments(node: fx.Node) -> tuple:
    """``(self, k, dim, largest, sorted)`` of an ``aten.topk`` call (its schema's names), defaults filled in."""
    names = ("self", "k", "dim", "largest", "sorted")
    values = call_arguments(node, names, {"self": None, "k": None, "dim": -1, "largest": True, "sorted": True})
    return tuple(values[name] for name in names)


class _Role(enum.Enum):
    """What one operand of the ReLU'd product is."""

    WEIGHT = "a weight"  # a parameter, a constant, or computed from parameters only
    GRAPH_INPUT = "a graph input"  # static-shaped, role unknown: a weight or keys passed in whole
    ACTIVATION = "an activation"


_DERIVED_WEIGHT_VISITS = 64  # a weight rescaled or merged in the graph is a handful of nodes


def _reads_parameters_only(node: fx.Node, params: frozenset[fx.Node]) -> bool:
    """Whether every graph input ``node`` depends on is a parameter (``w * gain``, ``w + A @ B``)."""
    seen, frontier, leaves = {node}, [node], 0
    while frontier:
        current = frontier.pop()
        if current.op == "placeholder":
            if current not in params:
                return False
            leaves += 1
            continue
        if current.op == "get_attr":
            leaves += 1
            continue
        for arg in current.all_input_nodes:
            if arg not in seen:
                if len(seen) >= _DERIVED_WEIGHT_VISITS:
                    return False
                seen.add(arg)
                frontier.append(arg)
    return leaves > 0


def _operand_role(node: fx.Node, params: frozenset[fx.Node] | None) -> _Role:
    """Classify an operand seen through views and casts; ``params`` are the known parameter inputs."""
    while is_call(node, VIEW_LIKE):
        node = node.args[0]
    if node.op == "get_attr":
        return _Role.WEIGHT
    if node.op == "placeholder":
        if params is not None and node in params:
            return _Role.WEIGHT
        value = fake_value(node)
        static = value is not None and not any(isinstance(s, torch.SymInt) for s in value.shape)
        return _Role.GRAPH_INPUT if static else _Role.ACTIVATION
    if params is not None and _reads_parameters_only(node, params):
        return _Role.WEIGHT
    return _Role.ACTIVATION


def product_under_relu(relu: fx.Node) -> fx.Node | None:
    """The contraction that the ReLU's input is a scaled/re-viewed copy of, if any."""
    frontier, seen = [relu_input(relu)], set()
    while frontier:
        node = frontier.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if is_call(node, CONTRACTIONS):
            return node
        if is_call(node, _SCORE_SCALING) and len(seen) < 16:
            frontier.extend(node.all_input_nodes)
    return None


def _product_operands(product: fx.Node) -> list[fx.Node]:
    if is_call(product, {aten.addmm, aten.baddbmm}):
        return [product.args[1], product.args[2]]
    if is_call(product, {aten.einsum}):
        return [a for a in product.args[1] if isinstance(a, fx.Node)]
    return [a for a in product.args[:2] if isinstance(a, fx.Node)]


def _carries_data(node: fx.Node) -> bool:
    """False for nodes that hold no input data: constants, factories (arange, full), size symbols."""
    if node.op == "get_attr":
        return False
    if node.op == "placeholder":
        return isinstance(fake_value(node), torch.Tensor)
    return bool(node.all_input_nodes)


def _share_an_input(a: fx.Node, b: fx.Node) -> bool:
    """Whether ``a`` and ``b`` are computed from a common data-carrying node.

    q and k of an index score both derive from the layer's hidden states (k also from the key
    cache); a weight, even one rescaled or merged in the graph (``w * gain``, ``w + A @ B``),
    derives from parameters only, which the activation it multiplies never reads. Both ancestries
    are walked in turn, so for q and k the search stops a few nodes up, where they meet.
    """
    if a is b:
        return _carries_data(a)
    seen = ({a}, {b})
    frontiers = (collections.deque([a]), collections.deque([b]))
    while frontiers[0] or frontiers[1]:
        for side in (0, 1):
            if not frontiers[side]:
                continue
            node = frontiers[side].popleft()
            for arg in node.all_input_nodes:
                if arg in seen[side]:
                    continue
                if arg in seen[1 - side] and _carries_data(arg):
                    return True
                seen[side].add(arg)
                frontiers[side].append(arg)
    return False


def classify_topk(node: fx.Node, params: frozenset[fx.Node] | None = None) -> TopkVerdict:
    """Decide whether one ``aten.topk`` node is a lightning indexer's top-k.

    ``params``: the graph's parameter placeholders when known (``graph_inputs``). The structure
    decides; a module path saying "indexer" only settles what the structure leaves open (keys
    that arrive as a graph input of unknown role, or q and k from disjoint inputs).
    """
    score, _, dim, _, _ = topk_arguments(node)
    return classify_selection(node, score, dim, params)


def classify_selection(node: fx.Node, score: fx.Node, dim: int, params: frozenset[fx.Node] | None) -> TopkVerdict:
    """Whether ``node``, a selection over axis ``dim`` of ``score`` (a top-k, or a sort cut to its first k), picks
    a lightning indexer's keys: the same structural test whatever op selects."""
    score_value = fake_value(score)
    path = module_path(node)
    named = "indexer" in (path or "").lower() or any("indexer" in t.lower() for t in module_types(node))
    if score_value is None:
        return TopkVerdict(node, False, (), "top-k input carries no shape metadata", undecided=True,
                           remedy="run the pass on a graph with fake values (torch.compile, torch.export and make_fx "
                                  "record them)")
    found, off_axis = _relu_product(node, score, score_value.shape[dim])
    evidence = [f"module path {path!r}"] if named else []
    if found is None:
        if off_axis is not None and _two_activations(off_axis, params):
            return TopkVerdict(node, False, tuple(evidence), (
                f"its score is read from ReLU({off_axis.name}), a product of two activations, but the top-k axis "
                "is none of that product's axes (sliced or padded between them): not settled"), undecided=True,
                remedy="score only the keys the top-k chooses from: cut or pad the keys before the q·k product, "
                       "not the scores after it")
        first = _first_products(score)
        if first is not None and len(first) == 1 and _projects(first[0], params) and not named:
            return TopkVerdict(node, False, tuple(evidence), (
                f"router or other top-k: its score is read from one projection ({first[0].name}), as a router's or a "
                "sampler's is, and from no ReLU(q·k) over the top-k axis"))
        read_from = ("more nodes than the walk reads" if first is None else "no product" if not first else
                     f"{len(first)} products ({', '.join(p.name for p in first[:4])})")
        reason = (f"no ReLU(q·k) score over the top-k axis; its score is read from {read_from}, not from one "
                  "projection as a router's or a sampler's is: an indexer written another way (another activation "
                  "than ReLU, q·k as a broadcast multiply and sum) is not ruled out")
        if named:
            reason = f"module path says indexer, but {reason}"
        return TopkVerdict(node, False, tuple(evidence), reason, undecided=True,
                           remedy="write the score as the sum over heads of w·ReLU(q·k) over the keys the top-k "
                                  "chooses from, q·k as a product (matmul, einsum)")
    evidence.insert(0, f"top-k over the key axis of ReLU({found.name})")
    operands = _product_operands(found)
    roles = [_operand_role(op, params) for op in operands]
    if _Role.WEIGHT in roles:  # no name outweighs this
        return TopkVerdict(node, False, tuple(evidence), "ReLU score multiplies a weight: a projection, not q·k")
    if _Role.GRAPH_INPUT in roles:
        tie = ("ReLU score multiplies a graph input of unknown role (a weight, or keys passed in whole): "
               "a projection, not q·k, unless a module path says indexer")
    elif len(operands) == 2 and _share_an_input(*operands):
        evidence.insert(1, "score is a product of two activations (q·k)")
        return TopkVerdict(node, True, tuple(evidence), "")
    else:
        tie = ("ReLU score multiplies two tensors computed from disjoint inputs (a derived weight): "
               "a projection, not q·k, unless a module path says indexer")
    if not named:
        return TopkVerdict(node, False, tuple(evidence), tie, undecided=True)
    evidence.append(f"the module path settles what the structure leaves open: {tie.split(':')[0]}")
    return TopkVerdict(node, True, tuple(evidence), "")


def _two_activations(product: fx.Node, params: frozenset[fx.Node] | None) -> bool:
    """Whether ``product`` multiplies two activations computed from a common input (what q·k is)."""
    operands = _product_operands(product)
    return (len(operands) == 2 and all(_operand_role(op, params) is _Role.ACTIVATION for op in operands)
            and _share_an_input(*operands))


def _projects(product: fx.Node, params: frozenset[fx.Node] | None) -> bool:
    """Whether ``product`` multiplies by a weight (or a graph input of unknown role, where parameters are not
    known): a projection, as a router's gate or a sampler's head."""
    return any(_operand_role(op, params) is not _Role.ACTIVATION for op in _product_operands(product))


def _relu_product(node: fx.Node, score: fx.Node, axis) -> tuple[fx.Node | None, fx.Node | None]:
    """The contraction under a ReLU that the top-k's score is reached from, with a dim of the key axis; else
    ``(None, the first such contraction met without that dim)`` (``(None, None)``: no ReLU product at all)."""
    frontier = [(score, 0)]
    seen: set[tuple[fx.Node, int]] = set()
    off_axis = None
    while frontier and len(seen) < _MAX_VISITS:
        current, crossed = frontier.pop()
        if (current, crossed) in seen or current.op != "call_function":
            continue
        seen.add((current, crossed))
        if is_relu(current):
            product = product_under_relu(current)
            value = fake_value(product) if product is not None else None
            if value is not None and any(same_size(axis, s) for s in value.shape):
                return product, None
            off_axis = off_axis or product
        if is_call(current, SELECTIONS) and current is not node:
            continue
        if is_call(current, CONTRACTIONS):
            if crossed >= 1:
                continue
            crossed += 1
        frontier.extend((arg, crossed) for arg in current.all_input_nodes)
    return None, off_axis


def _first_products(score: fx.Node) -> list[fx.Node] | None:
    """The contractions met first on the paths up from ``score``: the products it is read from, whatever lies
    between; None where the walk ran out before reaching them all. Another selection's values are followed to that
    selection's score (a group-limited router ranks groups by their top experts' scores); its indices are not
    (they lead into another layer's attention)."""
    found: dict[fx.Node, None] = {}
    walk = CallWalk([score], _MAX_VISITS)
    for current in walk:
        if is_call(current, CONTRACTIONS):
            found[current] = None
            continue
        if current.target is operator.getitem and is_call(current.args[0], SELECTIONS):
            if current.args[1] == 0:
                walk.extend([current.args[0].args[0]])
            continue
        if is_call(current, SELECTIONS):
            continue
        walk.extend(current.all_input_nodes)
    return list(found) if walk.finished else None


def find_topk_sites(graph: fx.Graph) -> tuple[list[IndexerSite], list[TopkVerdict]]:
    """Every indexer top-k in ``graph``, and the verdicts on the top-k left alone."""
    from .block_topk import classify_block_topk  # block_topk builds on this module's structure tests

    sites: list[IndexerSite] = []
    ignored: list[TopkVerdict] = []
    params = parameter_placeholders(graph)
    for node in graph.nodes:
        if not is_call(node, {aten.topk}):
            continue
        verdict = classify_topk(node, params)
        if not verdict.is_indexer:
            block = classify_block_topk(node, params)
            if block.is_indexer:
                continue  # a block indexer's top-k: block_topk reports it as a site
            if block.undecided:  # a pooled q·k the block finder could not settle says more than "no ReLU product"
                verdict = block
        readers = getitem_users(node, 1)
        if verdict.is_indexer and not readers:
            verdict = TopkVerdict(node, False, verdict.evidence, "indexer top-k whose indices nothing reads",
                                  undecided=True, remedy="read the indices in the graph that computes them")
        if not verdict.is_indexer:
            ignored.append(verdict)
            continue
        sites.append(TopkIndexerSite(node, readers[0], module_path(node), verdict.evidence))
    return sites, ignored
