"""What a detected indexer site is, and how one site takes over another's indices.

A site is one lightning indexer's top-k in a graph. Each kind of site (a plain ``aten.topk``,
vLLM's opaque indexer op, ...) knows three things about itself: whether its indices may be
replaced at all, whether another site's indices are a drop-in replacement, and how to make
the replacement. The rewrite driver (``rewrite/share.py``) only ever talks to this interface.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

from torch import fx

from ..graph_utils import comes_after, fake_value, same_size
from .index_frame import IndexFrame, index_frame
from .symbolic import SizeProver


@dataclasses.dataclass
class CacheWrite:
    """An S layer's indexer key-cache write that nothing reads once the layer shares indices."""

    write: fx.Node  # the mutation (``copy_`` into the cache input)
    nbytes: int  # bytes it writes per call, at the traced sizes


@dataclasses.dataclass(eq=False)
class IndexerSite(abc.ABC):
    """One indexer top-k in a graph; ``layer`` is its global decoder-layer index."""

    anchor: fx.Node
    indices: fx.Node
    module_path: str | None
    evidence: tuple[str, ...]
    layer: int | None = None  # None until detection places it, or when the index is unknown
    layer_source: str = ""
    #: Decoder layers whose attention reads these indices when that is more than one: the model itself
    #: already shares them (native sharing, GLM-5's ``indexer_types``); such a site is never rewired.
    readers: tuple[int, ...] = ()

    kind = "abstract"
    #: Whether ``module_path`` is the engine's own name of the decoder layer (vLLM's layer names), which then
    #: numbers the site whatever module consumes its indices.
    names_its_layer = False

    @abc.abstractmethod
    def refusal(self) -> str | None:
        """Why this site's own indices cannot be replaced by another's, or None."""

    def sizes(self) -> SizeProver:
        """Size equalities of this site's graph (unbacked widths of two layers proven equal where they are)."""
        return SizeProver(self.anchor.graph)

    def incompatibility(self, source: IndexerSite, sizes: SizeProver | None = None) -> str | None:
        """Why ``source``'s indices are not a drop-in replacement for ours, or None."""
        sizes = sizes or self.sizes()
        different = different_selections(self, source, f"layer {source.layer}")
        if different is not None:
            return different
        mine, theirs = fake_value(self.indices), fake_value(source.indices)
        if mine is None or theirs is None:
            return "indices carry no shape metadata to compare"
        if mine.dtype != theirs.dtype:
            return f"indices dtype {mine.dtype} differs from layer {source.layer}'s {theirs.dtype}"
        if not sizes.same_shape(mine.shape, theirs.shape):
            why = next((sizes.unproven(a, b) for a, b in zip(mine.shape, theirs.shape) if sizes.unproven(a, b)), "")
            return (
                f"indices shape {tuple(mine.shape)} differs from layer {source.layer}'s {tuple(theirs.shape)}"
                + (f": {why}" if why else "")
            )
        if mine.device != theirs.device:
            return f"indices live on {mine.device}, layer {source.layer}'s on {theirs.device}"
        if any(comes_after(source.indices, user) for user in self.indices.users):
            return f"layer {source.layer}'s indices are computed after this layer first uses its own"
        return self.frame().difference(source.frame(), f"layer {source.layer}")

    def frame(self) -> IndexFrame:
        """The token positions this site's indices stand for (``index_frame.py``), read once."""
        found = self.__dict__.get("_frame")
        if found is None:
            found = self.__dict__["_frame"] = index_frame(self.anchor, self.indices)
        return found

    def reuse(self, source: IndexerSite) -> None:
        """Point every consumer of our indices at ``source``'s; our indexer becomes dead code."""
        self.indices.replace_all_uses_with(source.indices)

    def cache_writes(self) -> list[CacheWrite]:
        """This site's own indexer key-cache writes (droppable once it shares), if it can tell."""
        return []

    def key_axis(self) -> int | None:
        """The axis of ``anchor.args[0]`` (the score) that the selection runs over, where the site selects from
        a score tensor in the graph (then its indices can be fed in from another graph); None for sites that
        do not (an opaque op, pooled key blocks)."""
        return None

    def key_width_mismatch(self, source: IndexerSite, equal_sizes: Callable[[Any, Any], bool]) -> str | None:
        """For two sites that select from score tensors (``key_axis``): why their scores differ in the number of
        keys they choose among, or None. ``equal_sizes``: the size equality that holds between their graphs (a
        ``SizeProver``'s within one graph, ``graph_utils.same_size`` across graphs)."""
        mine, theirs = fake_value(self.anchor.args[0]), fake_value(source.anchor.args[0])
        if mine is None or theirs is None:
            return "scores carry no shape metadata to compare"
        width, width2 = mine.shape[self.key_axis()], theirs.shape[source.key_axis()]
        if not equal_sizes(width, width2):
            return f"scores {width} keys wide, layer {source.layer}'s {width2}"
        return None

    def inserts_keys_itself(self) -> bool:
        """Whether the indexer call itself writes the layer's key cache, so sharing always drops that write."""
        return False


def different_selections(site: IndexerSite, source: IndexerSite, source_name: str) -> str | None:
    """Why ``site`` never takes the indices of ``source`` (called ``source_name`` in the message) for how the two
    select, or None: sites of different kinds (a top-k, a sort cut to k, ...) may order equal scores differently."""
    if type(source) is type(site):
        return None
    return (f"{source_name} selects with {source.kind}, this layer with {site.kind}: different selections never "
            "share (they may order equal scores differently)")


@dataclasses.dataclass
class TopkVerdict:
    """Why a top-k is (or is not) an indexer site: what every site finder reports for the top-k it leaves alone."""

    node: fx.Node
    is_indexer: bool
    evidence: tuple[str, ...]
    reason: str  # for rejected top-k: what it is taken for
    #: A rejection the structure does not settle (keys of unknown role, no shape metadata, an indexer nobody
    #: reads): the top-k may be a layer's indexer, so its layer is neither a source nor skipped (``hidden.py``).
    undecided: bool = False
    #: For an undecided rejection: what would let the pass read it (reports show it beside the layer left alone).
    remedy: str = "a module path naming an indexer (self.indexer = ...) settles keys of unknown role"


def same_arguments(a: object, b: object) -> bool:
    """Compare top-k style scalar arguments that may be SymInt nodes or plain values."""
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        va, vb = fake_value(a), fake_value(b)
        return a is b or (va is not None and vb is not None and same_size(va, vb))
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        value = fake_value(a if isinstance(a, fx.Node) else b)
        other = b if isinstance(a, fx.Node) else a
        return value is not None and same_size(value, other)
    return a == b
