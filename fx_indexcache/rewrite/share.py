"""Rewire every S layer to its F layer's indices and delete what became dead.

The driver decides per layer from the config and the detected sites, asks each site whether
the swap is safe, and leaves a layer untouched (with the reason) whenever it is not: the
result is either the IndexCache semantics or the original computation, never something else.

Which indices an S layer takes is the engines' one-buffer rule (``IndexCacheConfig.buffer_sources``):
the nearest preceding *indexed* layer that computes, whatever the layers between are marked, so a
hybrid stack (dense, sliding-window or linear-attention layers between DSA layers) pairs as vLLM and
SGLang pair it.

That rule needs every indexed layer to be seen: a layer holding a selection no finder reads
(``detection/hidden.py``) is neither a source nor skipped, and where such a selection's layer is not
known, no S layer takes a source from before it in graph order.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import fx

from ..config import FULL, IndexCacheConfig, Mark
from ..detection.layer_records import LayerRecord, write_record
from ..detection.registry import Detection
from ..detection.sites import IndexerSite
from ..graph_utils import CONTRACTIONS, dead_if_removed, erase_dead, fake_value, is_call, node_order, numel_hint
from .cache_ledger import CacheWriteConflict, CacheWriteLedger, WriteChoice


class Action(str, enum.Enum):
    """What the pass did with one DSA layer (a ``str`` so that reports compare with the plain words)."""

    COMPUTED = "computed"  # the layer computes its own indices
    SHARED = "shared"  # rewired to its F layer's indices; its indexer deleted
    LEFT = "left as is"  # marked S but not provably interchangeable: computes, and the note says why

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


COMPUTED, SHARED, LEFT = Action.COMPUTED, Action.SHARED, Action.LEFT
#: How a decision's note begins for a layer that computes only because a pipeline cut separates it from its F layer.
CUT_NOTE = "computed because of the pipeline cut"
#: ``LayerDecision.marked`` when the layer index is unknown, so the config cannot mark the layer.
UNMARKED = "?"


@dataclasses.dataclass
class LayerDecision:
    """What the pass did with one DSA layer of one graph."""

    layer: int | None  # None: the layer index is unknown (the report says why)
    marked: Mark | str  # as the config marks the layer; UNMARKED when the index is unknown
    action: Action
    source_layer: int | None  # the layer whose indices this layer uses
    nodes_removed: int = 0
    flops_removed_per_token: float = 0.0
    cache_bytes_saved: int = 0
    note: str = ""
    key_insert_dropped: bool = False  # shared, and its indexer op also wrote the layer's key cache (vLLM's)


def _flops(node: fx.Node) -> int:
    """Rough FLOP count of one node at the traced sizes: 2·M·N·K for products, numel otherwise."""
    value = fake_value(node)
    if not isinstance(value, torch.Tensor):
        return 0
    if is_call(node, {torch.ops.aten.einsum}):
        return _einsum_flops(node)
    out = numel_hint(value.shape)
    if is_call(node, CONTRACTIONS):
        operands = node.all_input_nodes
        first = fake_value(operands[1] if len(operands) > 2 else operands[0])
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            return 2 * out * numel_hint(first.shape[-1:])
    return out


def _einsum_flops(node: fx.Node) -> int:
    """2 × the product of every index's size: the multiply-adds of a plain einsum."""
    equation, operands = node.args[0], node.args[1]
    sizes: dict[str, int] = {}
    for letters, operand in zip(equation.split("->")[0].split(","), operands):
        value = fake_value(operand)
        for letter, size in zip(letters.strip(), value.shape if value is not None else ()):
            sizes[letter] = numel_hint([size])
    total = 2
    for size in sizes.values():
        total *= size
    return total


def _queries(site: IndexerSite) -> int:
    """How many query tokens one call scores: the indices' numel over k."""
    value = fake_value(site.indices)
    if value is None or value.dim() == 0:
        return 1
    return max(numel_hint(value.shape[:-1]), 1)


def _share(graph: fx.Graph, site: IndexerSite, source: IndexerSite, drop_writes: bool) -> LayerDecision:
    """Rewire one S layer and erase exactly the nodes that only its indexer needed.

    Erasing the dead cone directly (not a whole-graph DCE per layer) keeps the pass linear in
    the graph size for deep models.
    """
    roots = [site.anchor, *site.anchor.users, site.indices]
    saved = 0
    site.reuse(source)
    if drop_writes:
        for write in site.cache_writes():
            roots.extend(write.write.all_input_nodes)
            graph.erase_node(write.write)
            saved += write.nbytes
    candidates = [node for node in dict.fromkeys(roots) if node.graph is graph and not node.users]
    removed = dead_if_removed(node for node in candidates if not node.is_impure())
    flops = sum(_flops(node) for node in removed) / _queries(site)
    erase_dead(graph, removed)
    return LayerDecision(
        site.layer, Mark.S, SHARED, source.layer, len(removed), flops, saved, f"uses layer {source.layer}'s indices"
    )


def sources_in_graph(sites: list[IndexerSite], config: IndexCacheConfig, present: frozenset[int],
                   absent: Mapping[int, str] | None = None, stage_first_layer: int | None = None
                   ) -> dict[int, IndexerSite | str]:
    """``IndexCacheConfig.buffer_sources`` inside one graph, which may not hold every layer of the model.

    Per site (by layer), the site of this graph whose indices it uses under the engines' one-buffer rule:
    itself when it computes, the nearest preceding computing site when it shares, or why (str) that site is
    not in this graph.

    An S-marked site with no computing site before it computes when nothing indexed can come before it: every
    layer before it is ``present`` in this graph (and holds no computing indexer), or the config marks no F
    layer before it at all. Otherwise its source may be in an earlier graph (a break, a pipeline stage, a span
    of layers compiled on its own), and it is left as it is here. ``absent``:
    indexed layers of this graph whose indices cannot serve another layer, with why (an earlier rewrite
    deleted their indexer; they hold several indexers); one that would compute is a source nobody may take,
    so the S layers after it are left as they are.

    ``stage_first_layer``: the graph belongs to a pipeline stage that starts at that global layer (the user said
    so): no layer before it runs in this process, so the engines' buffer is empty when the stage starts, as vLLM
    and SGLang run a stage. The rule above then starts at the stage: the stage's first indexed layer computes, its
    later S layers read the nearest layer that computed, and an S layer whose F layer sits in an earlier stage is
    "first" when every layer of the stage before it is here.
    """
    found: dict[int, IndexerSite | str] = {}
    by_layer = {site.layer: site for site in sites}
    absent = absent or {}
    writer: IndexerSite | str | None = None  # None: no layer before computed, as far as this graph shows
    start = stage_first_layer or 0  # no layer before it wrote the buffer in this process

    def source_in_stage(layer: int) -> int | None:
        source = config.source_layer(layer)
        return source if source is not None and source >= start else None

    for layer in sorted({*by_layer, *absent}):
        site = by_layer.get(layer)
        if config.layer_kind(layer) == FULL:
            writer = site if site is not None else f"its source layer {layer} cannot serve it: {absent[layer]}"
            if site is not None:
                found[layer] = site
            continue
        if site is None:  # an S layer that cannot take part: it writes nothing
            continue
        if writer is not None:
            found[layer] = writer
        elif present.issuperset(range(start, layer)):  # every layer before it is here and none computed: the
            writer = found[layer] = site                  # first (of the model, or of its pipeline stage)
        elif source_in_stage(layer) is None:  # nothing marked F before it: it computes, but an indexed layer
            found[layer] = site               # in an earlier graph may have, so it serves no one
            writer = (f"layer {layer} computed with no F layer before it, but an indexed layer before this graph "
                      "may have computed too: which one the engines' buffer holds is not known here")
        else:
            found[layer] = (
                f"its F layer {config.source_layer(layer)} has no indexer site in this graph "
                "(graph break, pipeline stage, compiled region, or a layer without an indexer)"
            )
    _refuse_out_of_order(found, by_layer)
    return found


def _refuse_out_of_order(found: dict[int, IndexerSite | str], by_layer: Mapping[int, IndexerSite]) -> None:
    """Replace by a reason each source that is not also the last computing site before its S layer in the graph.

    The rule above reads "nearest preceding" by layer number; the engines' buffer holds whatever layer computed
    last as the model runs. The two agree only where the layers run in their numbered order, which the graph's
    order (the order the model ran in) shows: a site that computes between the source and the S layer there has
    a number outside that span (else it would be the source), so the model runs its layers out of order and the
    S layer keeps its own indices. A source that runs after the S layer is refused by ``incompatibility``."""
    if not by_layer:
        return
    position = node_order(next(iter(by_layer.values())).anchor.graph)
    computing = sorted((site for layer, site in by_layer.items() if found.get(layer) is site),
                       key=lambda site: position[site.anchor])
    for layer, source in found.items():
        site = by_layer[layer]
        if isinstance(source, str) or source is site:
            continue
        start, end = position[source.anchor], position[site.anchor]
        between = [other for other in computing if start < position[other.anchor] < end]
        if between:
            last = between[-1]
            found[layer] = (
                f"the model runs its layers out of their numbered order: layer {last.layer} computes after layer "
                f"{source.layer} and before this layer, so the engines' buffer would hold layer {last.layer}'s "
                f"indices, not layer {source.layer}'s"
            )


def _refusal(site: IndexerSite, source: IndexerSite | str) -> str | None:
    """Why S layer ``site`` cannot take ``source``'s indices in this graph, or None."""
    if isinstance(source, str):
        return source
    if site.readers:
        return (f"the model already shares: layers {', '.join(map(str, site.readers))} read these indices "
                "(native sharing); rewiring them would change every reader, so the layer is left as it is")
    return site.refusal() or site.incompatibility(source)


class DropProof(NamedTuple):
    """Whether a graph proves that nothing else computes its S layers (so their cache writes may go), and why."""

    proven: bool
    why: str


NOT_PROVEN = DropProof(False, "not proven that nothing else computes the layer")


class _Writes:
    """The cache-write side of the decisions: one choice per layer across the model's graphs.

    Sharing drops a site's writes where the op inserts its keys itself (vLLM's), or where the config drops
    explicit writes: ``drop_shared_indexer_cache_writes=True``, or left at None where ``proof`` holds. Every site
    that writes its cache is checked against the ledger when it computes, whatever this graph drops: an earlier
    graph's drop binds every later graph.
    """

    def __init__(self, config: IndexCacheConfig, ledger: CacheWriteLedger, proof: DropProof,
                 dropped_elsewhere: Callable[[str], list[str]] | None = None) -> None:
        self.config, self.ledger, self.scope = config, ledger, config.fingerprint()
        self.dropped_elsewhere = dropped_elsewhere
        chosen = config.drop_shared_indexer_cache_writes
        self.drops = chosen if chosen is not None else proof.proven
        #: Why the writes go (shown with each dropped layer), or why they stay.
        self.why = proof.why if chosen is None else f"drop_shared_indexer_cache_writes={chosen}"

    def at_stake(self, site: IndexerSite) -> bool:
        """Whether sharing ``site`` would drop cache writes. Ask before rewiring: it reads the graph."""
        return site.inserts_keys_itself() or (self.drops and bool(site.cache_writes()))

    @staticmethod
    def writes_cache(site: IndexerSite) -> bool:
        return site.inserts_keys_itself() or bool(site.cache_writes())

    @staticmethod
    def key(site: IndexerSite) -> str:
        """The layer's global number: every graph of the model names it so, whatever path it was reached by
        (``layers.1.indexer`` from the model, ``L.model.layers.1.indexer`` from a compiled function)."""
        return f"layer {site.layer}" if site.layer is not None else (site.module_path or "layer unknown")

    def earlier(self, site: IndexerSite) -> WriteChoice | None:
        return self.ledger.earlier(self.scope, self.key(site))

    def record(self, site: IndexerSite, choice: WriteChoice) -> None:
        self.ledger.record(self.scope, self.key(site), choice)

    def check_computing(self, site: IndexerSite, why: str) -> None:
        """A layer that computes here must not be one whose writes an earlier graph dropped."""
        if not self.writes_cache(site):
            return
        if site.layer is None:
            dropped = self.ledger.any_dropped(self.scope)
            if self.dropped_elsewhere is not None:
                dropped += [key for key in self.dropped_elsewhere(self.scope) if key not in dropped]
            if dropped:
                raise CacheWriteConflict(
                    f"IndexCache: this graph computes an indexer whose layer is unknown ({why}), and an earlier graph "
                    f"of the model dropped the key-cache writes of {', '.join(dropped[:4])}: the computing layer "
                    "might read cache rows nobody wrote. Set drop_shared_indexer_cache_writes=False."
                )
            return
        if self.earlier(site) is WriteChoice.DROPPED:
            raise CacheWriteConflict(
                f"IndexCache: layer {site.layer} ({site.module_path}) computes its indices in this graph ({why}), but an "
                "earlier graph of the same model dropped its indexer key-cache writes; it would read cache rows "
                "nobody wrote. Set drop_shared_indexer_cache_writes=False (or, for vLLM's op, let every graph of "
                "the model see the layer's F layer)."
            )
        self.record(site, WriteChoice.KEPT)


def apply_index_cache(
    graph: fx.Graph, detection: Detection, config: IndexCacheConfig, ledger: CacheWriteLedger,
    drop_proof: DropProof = NOT_PROVEN,
    stage_first_layer: int | None = None,
    dropped_elsewhere: Callable[[str], list[str]] | None = None,
) -> list[LayerDecision]:
    """Rewrite ``graph`` in place; one decision per detected site, in layer order.

    ``ledger`` holds the cache-write choices of the model's other graphs; it may turn a share into "share,
    writes kept", or raise ``CacheWriteConflict``. ``drop_proof``: whether no other graph or eager call of the model
    computes this graph's S layers (``IndexCachePass.drop_proof``), which lets the default
    ``drop_shared_indexer_cache_writes=None`` drop their key-cache writes. ``stage_first_layer``: the graph is part
    of a pipeline stage that starts there (``sources_in_graph``). ``dropped_elsewhere(scope)``: for a graph whose
    model is not known (a compiled function handed a block), the layers whose writes any model of the session
    dropped: an indexer of unknown layer there may be one of them.
    """
    writes = _Writes(config, ledger, drop_proof, dropped_elsewhere)
    if detection.unknown_reason is not None:
        for site in detection.sites:
            writes.check_computing(site, "layer index unknown")
        note = f"layer index unknown: {detection.unknown_reason.value}; computed"
        return [LayerDecision(None, UNMARKED, COMPUTED, None, note=note) for _ in detection.sites]
    absent = {layer: "an earlier rewrite of this graph made it read another layer's indices"
              for record in detection.records.values() for layer in record.serves}
    absent.update({site.layer: "it holds more than one indexer" for site, _ in detection.unplaced
                   if site.layer is not None and site.layer not in {s.layer for s in detection.sites}})
    absent.update({hidden.layer: f"it holds {hidden.what}, which the pass cannot read"
                   for hidden in detection.hidden if hidden.layer is not None})
    sources = sources_in_graph(detection.sites, config, detection.layers_present, absent, stage_first_layer)
    _blind_spots(graph, detection, config, sources)
    decisions = [_decide(graph, site, sources[site.layer], config, writes, stage_first_layer)
                 for site in detection.sites]
    if any(decision.action == SHARED for decision in decisions):  # otherwise the graph stays as it came
        graph.eliminate_dead_code()
        graph.lint()
    _record_layers(detection.sites, decisions, detection.records)
    return decisions


def _blind_spots(graph: fx.Graph, detection: Detection, config: IndexCacheConfig,
                 sources: dict[int, IndexerSite | str]) -> None:
    """Refuse, in ``sources``, every S layer whose source was chosen across a hidden selection of unknown layer.

    Such a selection may be an indexed layer that computed after the chosen source (the engines' buffer would
    hold its indices), or before a source that is marked S and only computes for want of an earlier one.
    """
    blind = [hidden for hidden in detection.hidden if hidden.layer is None]
    if not blind:
        return
    order = node_order(graph)
    for site in detection.sites:
        source = sources.get(site.layer)
        if not isinstance(source, IndexerSite) or source is site:
            continue
        own_source = config.layer_kind(source.layer) == FULL
        for hidden in blind:
            if order[hidden.node] > order[site.anchor]:
                continue
            if order[hidden.node] > order[source.anchor]:
                where = f"between it and its source layer {source.layer}"
            elif not own_source:
                where = (f"before its source layer {source.layer}, which is marked S and computes only as the first "
                         "indexed layer the graph shows")
            else:
                continue
            sources[site.layer] = (f"{hidden.what} (node {hidden.node.name}, its layer unknown) runs {where}: it may "
                                   "be an indexed layer whose indices the engines would hand this one")
            break


def _decide(graph: fx.Graph, site: IndexerSite, source: IndexerSite | str, config: IndexCacheConfig,
            writes: _Writes, stage_first_layer: int | None = None) -> LayerDecision:
    layer = site.layer
    marked = config.layer_kind(layer)
    if source is site:
        if marked == FULL:
            writes.check_computing(site, "marked F")
            return LayerDecision(layer, marked, COMPUTED, layer)
        writes.check_computing(site, "marked S with no indexed layer computing before it")
        note = ("marked S with no indexed layer computing before it: computed as F (vLLM would read an unset "
                "buffer)")
        cut = config.source_layer(layer)
        if stage_first_layer and cut is not None and cut < stage_first_layer:
            note = (f"{CUT_NOTE}: its F layer {cut} is in an earlier stage (this stage starts at layer "
                    f"{stage_first_layer}); it computes, as the engines' first indexed layer of a stage does")
        return LayerDecision(layer, marked, COMPUTED, layer, note=note)
    reason = _refusal(site, source)
    at_stake = writes.at_stake(site)
    keep_writes = at_stake and writes.earlier(site) is WriteChoice.KEPT
    if reason is None and keep_writes and site.inserts_keys_itself():
        reason = "an earlier graph of this model kept this layer's key-cache insert, which sharing would drop"
    if reason is not None:  # a source outside the graph (str) is a refusal too
        writes.check_computing(site, reason)
        return LayerDecision(layer, marked, LEFT, layer, note=reason)
    explicit_writes = bool(site.cache_writes())  # asked before the rewiring erases the cone they hang off
    decision = _share(graph, site, source, drop_writes=at_stake and not keep_writes)
    decision.key_insert_dropped = site.inserts_keys_itself()
    if at_stake:
        writes.record(site, WriteChoice.KEPT if keep_writes else WriteChoice.DROPPED)
    if keep_writes:
        decision.note += "; its cache writes kept, as an earlier graph of this model kept them"
    elif decision.cache_bytes_saved:
        decision.note += f"; its key-cache writes dropped ({writes.why})"
    elif explicit_writes and not at_stake:
        decision.note += f"; its key-cache writes kept ({writes.why})"
    return decision


def _record_layers(sites: list[IndexerSite], decisions: list[LayerDecision], earlier: dict) -> None:
    """Write each surviving site's layer, and the S layers it serves, into the graph (see layer_records)."""
    serves: dict[int, list[int]] = {}
    for decision in decisions:
        if decision.action == SHARED:
            serves.setdefault(decision.source_layer, []).append(decision.layer)
    for site, decision in zip(sites, decisions):
        if decision.action != SHARED:
            before = earlier.get(site.layer, LayerRecord(site.layer)).serves
            write_record(site.anchor, LayerRecord(site.layer, (*before, *serves.get(site.layer, ()))))
