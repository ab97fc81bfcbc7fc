"""Find every indexer site in a graph and give each its global decoder-layer index, or none.

Site finders are registered per graph form (plain ``aten.topk`` here; vLLM's opaque
indexer op registers its own), so the rewrite never needs to know which form it edits.
The layer index comes from, in this order: the record an earlier rewrite left in the graph,
the module path (``layers.N``), or the graph's own order when the graph provably starts at the
model's first DSA layer. Otherwise it is unknown, and no layer may be marked S on a guess.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
from collections.abc import Callable

from torch import fx

from ..graph_utils import CONTRACTIONS, VIEW_LIKE, is_call, node_order
from .graph_inputs import input_name, parameter_placeholders
from .hidden import HiddenSelection, hidden_selections
from .layer_records import LayerRecord, read_record
from .layers import consumer_slots, layer_slot, module_path
from .padded_products import restore_padded_products
from .sites import IndexerSite, TopkVerdict
from .topk import find_topk_sites

SiteFinder = Callable[[fx.Graph], tuple[list[IndexerSite], list[TopkVerdict]]]
#: How many blocks a layer list of the graph's model holds (its path as ``layer_slot`` spells it), None: not known.
ContainerBlocks = Callable[[str], "int | None"]

SITE_FINDERS: dict[str, SiteFinder] = {"aten.topk": find_topk_sites}


class LayerSource(str, enum.Enum):
    """Where a graph's layer indices came from."""

    MODULE_PATH = "module path"
    WHOLE_GRAPH_ORDER = "whole-graph order"
    RECORDED = "an earlier IndexCache rewrite's record"
    UNKNOWN = "unknown"
    NO_SITES = "no indexer sites"
    FX_GRAPH_CACHE = "FX graph cache"  # the pass did not run: Inductor served the graph from its cache
    NO_CONFIG = "unresolved"  # the pass did not run: no IndexCache config was in force


class UnknownLayerIndex(str, enum.Enum):
    """Why a graph's layer indices are unknown (then every layer in it computes)."""

    NO_PROOF = (
        "no module path with a layer number, and nothing tells that this graph starts at the model's first "
        "layer (pass graph_starts_at_first_layer=True to IndexCachePass if it does)"
    )
    NOT_WHOLE_GRAPH = (
        "no module path with a layer number, and this graph does not start at the compiled callable's top: "
        "a dynamo resume function after a graph break, or a function or module dynamo compiled on its own "
        "(one graph that may serve several layers)"
    )
    NO_LAYER_COUNT = (
        "no module path with a layer number, and the model's decoder-layer count is unknown, so graph order "
        "cannot prove that every decoder layer holds exactly one indexer (give num_layers or "
        "index_topk_pattern, or compile a model whose config has num_hidden_layers)"
    )
    COUNT_MISMATCH = (
        "no module path with a layer number, and the graph's indexer count is not the model's decoder-layer "
        "count: graph order cannot tell which layers hold them (dense or sliding layers between DSA layers, "
        "several indexers a layer, or part of the model)"
    )
    ORDER_CONTRADICTS_PATHS = "graph order contradicts the layer numbers some module paths carry"
    TWO_SITES_ONE_INPUT = (
        "no module path with a layer number, and two indexers score the same hidden states, so they sit in one "
        "layer: the indexer count only matches the layer count by chance, and graph order proves nothing"
    )
    TWO_SITES_ONE_WEIGHT = (
        "no module path with a layer number, and two indexers project with the same weight: one indexer tied "
        "across layers and one layer's indexer called twice look alike, so graph order proves nothing"
    )
    HIDDEN_SELECTION = (
        "no module path with a layer number, and the graph holds a selection no finder reads (a top-k inside a "
        "subgraph, or an opaque op that outputs indices): it may be one more indexer, so graph order proves nothing"
    )
    UNPROVEN_CONTAINER = (
        "the module paths number a list that is not proven to be the model's layer list (a slice or alias of it in "
        "a frame local, another list of the same blocks): its positions need not be the model's layers"
    )
    PATHS_SPLIT_ONE_LAYER = (
        "the module paths number two indexers as different layers, but both score the same hidden states, so they "
        "sit in one layer (a layer's own list of indexers, compiled alone): the numbers are not decoder layers"
    )
    PATHS_SPLIT_ONE_WEIGHT = (
        "the module paths number two indexers as different layers, but both project with the same weight (one "
        "indexer tied across the list, or one indexer called twice): the numbers need not be decoder layers"
    )
    RIVAL_CONTAINERS = (
        "the indexers serve layers of more than one layer list (a vision tower's and the language model's, say), "
        "and the model's decoder-layer count names none or several of them: which list the pattern numbers is not "
        "proven (give num_layers, compile a model whose config has num_hidden_layers, or compile the decoder stack alone)"
    )
    PARTIAL_RECORD = "some sites carry an earlier rewrite's layer record and others do not"
    STAGE_NUMBERED_FROM_ZERO = (
        "the module paths number a layer list that holds fewer blocks than the model has decoder layers: a "
        "pipeline stage whose layers are numbered from 0, whose global numbers are not known (pass "
        "stage_first_layer=N to the backend or the pass)"
    )


#: A fingerprint of each finder's code, computed at registration: part of the pass's uuid.
_FINDER_FINGERPRINTS: dict[str, str] = {}


def _finder_fingerprint(name: str, finder: SiteFinder) -> str:
    """Hash of the finder's qualified name and source (or bytecode); raises if neither is readable."""
    qualified = f"{getattr(finder, '__module__', '?')}.{getattr(finder, '__qualname__', type(finder).__qualname__)}"
    try:
        body = inspect.getsource(finder).encode()
    except (OSError, TypeError):
        code = getattr(finder, "__code__", None) or getattr(getattr(finder, "__call__", None), "__code__", None)
        if code is None:
            raise ValueError(
                f"register_site_finder: finder {name!r}={finder!r} has neither readable source nor bytecode, "
                "so the pass's uuid could not cover it; pass a plain function"
            ) from None
        body = code.co_code + repr(code.co_consts).encode()
    return hashlib.sha256(qualified.encode() + b"\0" + body).hexdigest()


def register_site_finder(name: str, finder: SiteFinder) -> None:
    """Add a finder for another graph form of the indexer (idempotent per name); its code joins the uuid."""
    _FINDER_FINGERPRINTS[name] = _finder_fingerprint(name, finder)
    SITE_FINDERS[name] = finder


def finders_fingerprint() -> str:
    """One string covering every registered finder, for the pass's uuid."""
    for name, finder in SITE_FINDERS.items():
        if name not in _FINDER_FINGERPRINTS:  # added to the dict directly
            _FINDER_FINGERPRINTS[name] = _finder_fingerprint(name, finder)
    return "|".join(f"{name}={_FINDER_FINGERPRINTS[name]}" for name in sorted(SITE_FINDERS))


@dataclasses.dataclass
class Detection:
    """Indexer sites sorted by layer, the top-k left alone, and what could not be placed."""

    sites: list[IndexerSite]
    ignored: list[TopkVerdict]
    unplaced: list[tuple[IndexerSite, str]]
    nested_regions: list[str]  # subgraphs (nested_compile_region bodies) that hold indexers
    layer_source: LayerSource
    unknown_reason: UnknownLayerIndex | None = None
    records: dict[int, LayerRecord] = dataclasses.field(default_factory=dict)  # layer → earlier record
    unknown_detail: str = ""  # the counts behind ``unknown_reason``, when it has any
    #: Decoder layers this graph provably holds (any node's module path in the sites' layer container, or
    #: every layer when graph order numbered it): an S layer with no computing layer before it computes only
    #: when every layer before it is here (none computes), not when it may sit in an earlier graph.
    layers_present: frozenset[int] = frozenset()
    container: str | None = None  # the layer container the module paths name (``model.layers``), when they do
    stage_shift: int = 0  # added to the module paths' numbers: a pipeline stage's list numbered from 0
    #: The model's own name for the layer list, where the module paths reached it through a frame local.
    model_container: str | None = None
    #: Selections no finder reads (``hidden.py``), each placed in its layer where its node's module path names one
    #: of the sites' container; a layer holding one is never a source, nor skipped as one without an indexer.
    hidden: list[HiddenSelection] = dataclasses.field(default_factory=list)
    #: Products in selections' scores that Inductor had padded for alignment, restored before reading
    padded_products_restored: int = 0

    @property
    def unknown_text(self) -> str:
        """``unknown_reason`` with its detail, for reports and warnings."""
        if self.unknown_reason is None:
            return ""
        return self.unknown_reason.value + (f" ({self.unknown_detail})" if self.unknown_detail else "")


def _subgraph_modules(graph: fx.Graph) -> list[tuple[str, fx.GraphModule]]:
    owner = graph.owning_module
    if owner is None:
        return []
    found = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            target = getattr(owner, str(node.target), None)
            if isinstance(target, fx.GraphModule):
                found[str(node.target)] = target
    return list(found.items())


def _find_all(graph: fx.Graph) -> tuple[list[IndexerSite], list[TopkVerdict]]:
    sites: list[IndexerSite] = []
    ignored: list[TopkVerdict] = []
    for finder in SITE_FINDERS.values():
        found, skipped = finder(graph)
        sites.extend(found)
        ignored.extend(skipped)
    order = node_order(graph)
    sites.sort(key=lambda site: order[site.anchor])
    return sites, ignored


def detect(graph: fx.Graph, graph_starts_at_first_layer: bool | None = None,
           layer_count: int | None = None, container_blocks: ContainerBlocks | None = None) -> Detection:
    """Find the sites and give each its decoder-layer index, or none (see ``_assign_layers``).

    ``graph_starts_at_first_layer`` says whether the graph begins at the model's first layer (True for an
    exported program, a backend tells it for a dynamo graph; None: not known). ``layer_count`` is the model's
    decoder-layer count where a config or the keys state it: graph order numbers sites only when the graph
    holds exactly that many, one a layer, and where indexers serve layers of several lists, the one list of that
    many blocks is the decoder stack. ``container_blocks`` tells how many blocks a list (as ``layer_slot`` spells
    it) of the graph's model holds (None: not known; then the layers the graph holds of it are counted).

    Products Inductor padded for alignment are restored first, in ``graph`` and its subgraphs
    (``padded_products.py``): every reader of a score sees the plain product, whichever form the card's timing chose.
    """
    subgraphs = _subgraph_modules(graph)
    restored = sum(restore_padded_products(g) for g in (graph, *(module.graph for _, module in subgraphs)))
    sites, ignored = _find_all(graph)
    found = functools.lru_cache(maxsize=None)(_find_all)  # each subgraph read once, for both uses below
    nested = []
    for name, module in subgraphs:
        inner, _ = found(module.graph)
        if inner:
            nested.append(f"{name} ({len(inner)} indexer top-k)")
    detection = Detection(sites, ignored, [], nested, LayerSource.NO_SITES, padded_products_restored=restored)
    detection.hidden = hidden_selections(graph, sites, ignored, found)
    if sites:
        _assign_layers(detection, graph, graph_starts_at_first_layer, layer_count, container_blocks)
        _place_hidden(detection)
    return detection


def _place_hidden(detection: Detection) -> None:
    """Give each hidden selection its layer where its module path names the sites' container; a visible site in
    such a layer is set aside (the layer holds two selections, and which one its attention reads is not known).
    Graph order cannot number a graph that hides one: it may be one more indexer, in any layer."""
    if not detection.hidden or detection.unknown_reason is not None:
        return
    if detection.layer_source is LayerSource.WHOLE_GRAPH_ORDER:
        _unknown(detection, UnknownLayerIndex.HIDDEN_SELECTION, detection.hidden[0].what)
        return
    container = detection.container or _sites_container(detection.sites)
    for hidden in detection.hidden:
        slot = layer_slot(module_path(hidden.node))
        if container is not None and slot is not None and slot[0] == container:
            hidden.layer = slot[1]
    layers = {hidden.layer: hidden for hidden in detection.hidden if hidden.layer is not None}
    detection.unplaced += [(site, f"layer {site.layer} also holds {layers[site.layer].what}, which the pass cannot "
                                  "read: which selection its attention reads is not known")
                           for site in detection.sites if site.layer in layers]
    detection.sites = [site for site in detection.sites if site.layer not in layers]


def _sites_container(sites: list[IndexerSite]) -> str | None:
    """The one layer container the sites' module paths name (spelled as ``layer_slot`` spells it, as the hidden
    selections' slots are), else None."""
    names = {slot[0] for site in sites if (slot := layer_slot(site.module_path)) is not None}
    return next(iter(names)) if len(names) == 1 else None


def _assign_layers(detection: Detection, graph: fx.Graph, graph_starts_at_first_layer: bool | None,
                   layer_count: int | None, container_blocks: ContainerBlocks | None = None) -> None:
    """The rule: a layer index is proven or absent.

    1. An earlier rewrite's record (a second application never renumbers).
    2. Module paths: the decoder layer whose attention *consumes* a site's indices, else the numbered module
       that holds its top-k; the sites are numbered in one layer container (the repeated block of the model's
       layer list), the only one they serve or the only one of the model's decoder-layer count (a vision tower's
       indexers beside the language model's are set aside; with no such proof, none is numbered), and a site read
       by several layers is the model's own sharing (``IndexerSite.readers``).
    3. Graph order, only for a graph that starts at the model's first layer and holds exactly one indexer per
       decoder layer of a model whose layer count is known. Dense or sliding layers between DSA layers, two
       indexers a layer or part of a model would otherwise shift every index after them.
    4. Otherwise unknown: every layer computes, and the report and a warning say why.
    """
    sites = detection.sites
    records = [read_record(site.anchor) for site in sites]
    if all(records):
        detection.records = {record.layer: record for record in records}
        _place(detection, [record.layer for record in records], LayerSource.RECORDED)
        return
    if any(records):
        _unknown(detection, UnknownLayerIndex.PARTIAL_RECORD)
        return
    slots = [_site_slot(site) for site in sites]
    if all(slot is not None for slot in slots):
        main, rivalry = _decoder_container(slots, graph, layer_count, container_blocks)
        if main is None:
            _unknown(detection, UnknownLayerIndex.RIVAL_CONTAINERS, rivalry)
            return
        detection.container = _place_by_slots(detection, slots, main)
        detection.layers_present = frozenset(_layers_in(graph, main))
        # Numbered by their own list, not by a layer consuming their indices: that list may be one layer's own
        # (its indexers, compiled alone). Two such sites scoring one input sit in one layer.
        apart = [site for site in detection.sites if site.layer is not None and not site.names_its_layer
                 and not consumer_slots(site.indices)]
        if (shared := _sites_scoring_one_input(apart, graph)) is not None:
            first, second = apart[shared.first], apart[shared.second]
            _unknown(detection, UnknownLayerIndex.PATHS_SPLIT_ONE_WEIGHT if shared.is_weight
                     else UnknownLayerIndex.PATHS_SPLIT_ONE_LAYER,
                     f"{first.module_path} and {second.module_path}, numbered {first.layer} and {second.layer}, "
                     f"both read {input_name(graph, shared.node)}")
    elif graph_starts_at_first_layer is not True:
        reason = UnknownLayerIndex.NO_PROOF if graph_starts_at_first_layer is None else UnknownLayerIndex.NOT_WHOLE_GRAPH
        _unknown(detection, reason)
    elif layer_count is None:
        _unknown(detection, UnknownLayerIndex.NO_LAYER_COUNT)
    elif len(sites) != layer_count:
        _unknown(detection, UnknownLayerIndex.COUNT_MISMATCH,
                 f"{len(sites)} indexers, {layer_count} decoder layers")
    elif any(slot is not None and slot[1] != order for order, slot in enumerate(slots)):
        _unknown(detection, UnknownLayerIndex.ORDER_CONTRADICTS_PATHS)
    elif (shared := _sites_scoring_one_input(sites, graph)) is not None:
        _unknown(detection, UnknownLayerIndex.TWO_SITES_ONE_WEIGHT if shared.is_weight
                 else UnknownLayerIndex.TWO_SITES_ONE_INPUT,
                 f"the indexers at graph positions {shared.first} and {shared.second} both read "
                 f"{input_name(graph, shared.node)}")
    else:
        _place(detection, list(range(len(sites))), LayerSource.WHOLE_GRAPH_ORDER)
        detection.layers_present = frozenset(range(len(sites)))


_INPUT_WALK = 48  # nodes walked up from a site's score to find what its projections read


def _projected_inputs(site: IndexerSite) -> set[fx.Node]:
    """What a site's projections read (``x`` and ``wq`` of ``x @ wq``; a key cache it scores): the operands of
    the first contraction on each path up from its score that takes a graph input or constant directly."""
    found: set[fx.Node] = set()
    frontier, seen = [site.anchor.args[0]], set()
    while frontier and len(seen) < _INPUT_WALK:
        node = frontier.pop()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if is_call(node, CONTRACTIONS):
            operands = [_through_views(arg) for arg in node.all_input_nodes]
            if any(arg.op in ("placeholder", "get_attr") for arg in operands):
                found.update(arg for arg in operands if arg.op != "get_attr")
                continue
        frontier.extend(node.all_input_nodes)
    return found


def _through_views(node: fx.Node) -> fx.Node:
    while is_call(node, VIEW_LIKE) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


@dataclasses.dataclass(frozen=True)
class SharedInput:
    """Two sites (positions in the list searched) whose projections read one node, and whether it is a
    parameter: hidden states change from one layer to the next, so a shared activation puts both in one layer,
    while a shared weight may as well be one indexer tied across layers. Either way graph order proves nothing;
    the refusal says which was seen."""

    first: int
    second: int
    node: fx.Node
    is_weight: bool


def _sites_scoring_one_input(sites: list[IndexerSite], graph: fx.Graph) -> SharedInput | None:
    """The first two sites whose projections read the same node (activations before weights: a shared
    activation is the stronger evidence), else None."""
    weights = parameter_placeholders(graph) or frozenset()
    owner: dict[fx.Node, int] = {}
    shared_weight: SharedInput | None = None
    for position, site in enumerate(sites):
        for node in sorted(_projected_inputs(site), key=lambda n: n.name):
            earlier = owner.setdefault(node, position)
            if earlier == position:
                continue
            if node not in weights:
                return SharedInput(earlier, position, node, is_weight=False)
            shared_weight = shared_weight or SharedInput(earlier, position, node, is_weight=True)
    return shared_weight


def _layers_in(graph: fx.Graph, container: str) -> set[int]:
    """The layer numbers of ``container`` that some node of ``graph`` was traced under."""
    found = set()
    for node in graph.nodes:
        slot = layer_slot(module_path(node)) if node.op == "call_function" else None
        if slot is not None and slot[0] == container:
            found.add(slot[1])
    return found


def _site_slot(site: IndexerSite) -> tuple[str, int] | None:
    """The (container, layer) a site serves: where its indices are consumed, else where its top-k runs.

    Sets ``site.readers`` when the indices are consumed in more than one layer of one container."""
    own = layer_slot(site.module_path)
    if site.names_its_layer:
        return own
    consumers = consumer_slots(site.indices)
    containers = {container for container, _ in consumers}
    if len(containers) != 1:
        return own
    read_by = sorted(layer for _, layer in consumers)
    (container,) = containers
    if len(read_by) > 1:
        site.readers = tuple(read_by)
        if own is not None and own[0] == container and own[1] in read_by:
            return own
    return container, read_by[0]


def _decoder_container(slots: list[tuple[str, int]], graph: fx.Graph, layer_count: int | None,
                       container_blocks: ContainerBlocks | None) -> tuple[str | None, str]:
    """The layer container the pattern numbers, or None and why no container is proven to be it.

    The only container the sites serve is it. Among several (a vision tower's indexers and the language model's),
    it is the one whose block count is the model's decoder-layer count; site counts prove nothing (a tower may hold
    as many indexers as the decoder, or more)."""
    served = list(dict.fromkeys(container for container, _ in slots))
    if len(served) == 1:
        return served[0], ""
    blocks = {container: _container_size(graph, container, container_blocks) for container in served}
    sizes = ", ".join(f"{container} ({'?' if n is None else n} blocks)" for container, n in blocks.items())
    if layer_count is None:
        return None, f"indexers serve {sizes}; the model's decoder-layer count is not known"
    matching = [container for container, n in blocks.items() if n == layer_count]
    if len(matching) == 1:
        return matching[0], ""
    return None, f"indexers serve {sizes}; the model has {layer_count} decoder layers"


def _container_size(graph: fx.Graph, container: str, container_blocks: ContainerBlocks | None) -> int | None:
    """Blocks in ``container``: the model's list where it is known, else the layers of it the graph holds where they
    are 0..n-1 (a whole graph)."""
    known = container_blocks(container) if container_blocks is not None else None
    if known is not None:
        return known
    present = _layers_in(graph, container)
    return len(present) if present == set(range(len(present))) else None


def _place_by_slots(detection: Detection, slots: list[tuple[str, int]], main: str) -> str:
    """Place sites by their slots; sites serving a container other than ``main`` (the decoder stack) are set
    aside."""
    others = [(site, slot) for site, slot in zip(detection.sites, slots) if slot[0] != main]
    kept = [(site, slot) for site, slot in zip(detection.sites, slots) if slot[0] == main]
    detection.sites = [site for site, _ in kept]
    _place(detection, [slot[1] for _, slot in kept], LayerSource.MODULE_PATH)
    detection.unplaced += [
        (site, f"its indices serve {slot[0]}.{slot[1]}, outside the layer container {main!r} that holds the "
               "other indexers: no one decoder-layer numbering covers both") for site, slot in others]
    return main


def renumber(detection: Detection, numbers: dict[int, int], container: str, model_container: str) -> None:
    """Module-path numbers made the model's: ``numbers`` maps each (a frame local's positions, say) to the model's
    layer in its list ``model_container`` (``container``: the same, spelled as ``layer_slot`` spells it)."""
    for site in detection.sites:
        if site.layer is not None:
            site.layer = numbers[site.layer]
            site.readers = tuple(numbers[layer] for layer in site.readers)
    for site, _ in detection.unplaced:
        if site.layer is not None and site.layer in numbers:
            site.layer = numbers[site.layer]
    detection.layers_present = frozenset(numbers[layer] for layer in detection.layers_present if layer in numbers)
    for hidden in detection.hidden:
        if hidden.layer is not None:
            hidden.layer = numbers[hidden.layer]
    detection.sites.sort(key=lambda site: site.layer)
    detection.container, detection.model_container = container, model_container


def refuse_rival_lists(detection: Detection, detail: str) -> None:
    """Leave the sites unnumbered: the model holds another list of blocks as long as theirs, and this graph cannot
    tell which one is the decoder stack."""
    _unknown(detection, UnknownLayerIndex.RIVAL_CONTAINERS, detail)


def refuse_container(detection: Detection, why: str) -> None:
    """Leave the sites unnumbered: their module paths' container is not proven to be the model's layer list."""
    _unknown(detection, UnknownLayerIndex.UNPROVEN_CONTAINER, why)


def shift_to_global(detection: Detection, first_layer: int) -> None:
    """Stage-local layer numbers (a pipeline stage built from ``layers[first_layer:]``) made global."""
    for site in detection.sites:
        if site.layer is not None:
            site.layer += first_layer
            site.readers = tuple(layer + first_layer for layer in site.readers)
    detection.layers_present = frozenset(layer + first_layer for layer in detection.layers_present)
    for hidden in detection.hidden:
        if hidden.layer is not None:
            hidden.layer += first_layer
    detection.stage_shift = first_layer


def refuse_stage_numbering(detection: Detection, stage_layers: int, model_layers: int) -> None:
    """Leave a stage's sites unnumbered: their module paths count from 0 in a list of ``stage_layers`` blocks of a
    ``model_layers``-layer model, and reading them as global numbers would apply the wrong characters."""
    _unknown(detection, UnknownLayerIndex.STAGE_NUMBERED_FROM_ZERO,
             f"{stage_layers} blocks in the list, {model_layers} decoder layers in the model")


def _unknown(detection: Detection, reason: UnknownLayerIndex, detail: str = "") -> None:
    detection.layer_source, detection.unknown_reason, detection.unknown_detail = LayerSource.UNKNOWN, reason, detail
    for site in detection.sites:
        site.layer, site.layer_source = None, LayerSource.UNKNOWN


def _doubled_reason(site: IndexerSite, paths_in_layer: list[str | None]) -> str:
    """Why a layer's sites are set aside: one indexer module run more than once (a recurrent stack runs its blocks
    again) is told apart from a layer with several indexers, though both are refused for one reason: no site of the
    layer is *the* layer's selection."""
    if site.module_path is not None and paths_in_layer.count(site.module_path) > 1:
        return (f"layer {site.layer}'s indexer ({site.module_path}) runs {paths_in_layer.count(site.module_path)} "
                "times in this graph: each run selects for another input, so none is the layer's one selection; "
                "they are left as they are")
    return (f"layer {site.layer} holds more than one indexer: they are left as they are, never paired with "
            "another layer's indexers by position")


def _place(detection: Detection, layers: list[int], source: LayerSource) -> None:
    """Give each site its layer; several sites in one layer are all set aside (unplaced): pairing them with
    another layer's sites by position would be a guess."""
    detection.layer_source = source
    seen: dict[int, IndexerSite] = {}
    doubled: set[int] = set()
    for site, layer in zip(detection.sites, layers):
        site.layer, site.layer_source = layer, source
        if layer in seen:
            doubled.add(layer)
        seen.setdefault(layer, site)
    paths: dict[int, list[str | None]] = {}
    for site in detection.sites:
        paths.setdefault(site.layer, []).append(site.module_path)
    detection.unplaced = [(site, _doubled_reason(site, paths[site.layer]))
                          for site in detection.sites if site.layer in doubled]
    placed = [site for site in detection.sites if site.layer not in doubled]
    detection.sites = sorted(placed, key=lambda site: site.layer)
