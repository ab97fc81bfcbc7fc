"""IndexCache across graphs: one compiled layer graph that runs as every layer, decided per call on the host.

When a graph break falls inside the decoder-layer loop (an explicit break, or MoE dispatch that reads
``bincount().tolist()``), dynamo compiles each layer on its own frame and reuses that one graph for every
layer: its module paths are relative (``indexer``), so no layer index is known when it is compiled. Which
layer a call runs *is* known when it is called: with ``inline_inbuilt_nn_modules`` the layer's parameters
are graph inputs, and their storage (``data_ptr``) is found in the model's ``named_parameters()`` under
``layers.N....``, which gives the layer N (and the layer container ``layers``).

So the backend keeps three callables for such a graph (``crossgraph.build``): the graph as it is, an
F variant that also writes its indices into the model's static buffer (below), and an S variant
without the indexer that takes the F layer's indices as an extra input. Before each call the wrapper
(``CrossGraphCallable``) decides on the host, from bookkeeping only (no device sync):

* a layer marked F runs the F variant and publishes;
* a layer marked S runs the S variant only if the model's forward is running (its forward pre-hook opened
  this call and its always-called forward hook has not closed it), this call is still on its first pass
  over the layers (a layer at or below the last one means a second pass: interleaved micro-batches look
  just like it), its F layer published in this pass and the layers since ran consecutively
  ``F, F+1, ..., L-1``, and the published indices have the shape the S graph expects (evaluated from this
  call's input sizes), its dtype and device;
* anything else (parameters that map to no single layer, a check that fails) runs the graph as it is.

The same bookkeeping serves graphs whose layers *are* numbered (``NumberedGraphCallable``): a model split
by a graph break in its top frame (layers 0-2 in one graph, 3-5 in the next) publishes the indices of the
first graph's last F layer, and the second graph's leading S layers read them under the same check.

Published indices live in a **static buffer** per model, layer container, thread and indices shape
(``Timeline.buffer``): the F graph writes it in place (an input it mutates), the S graphs read it (an
input), both at a fixed address. So CUDA graphs (cudagraph trees) neither copy it per call nor read an
output that a later replay overwrote; the host check guarantees that what is read was written by the
source F layer in this forward call (no other F layer writes the buffer in between: it would be the
reader's source instead).

An S variant hands back its own copy wherever the read indices would leave the graph (``indices_io``), so a
model that keeps an S layer's indices never sees them change when a later F layer publishes again.

What it cannot see: layers of the model that run outside this backend's compiled graphs (eagerly, or
through another compile) between an F layer and its S layers (docs/limits.md says so).
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sympy
import torch
from torch import nn

from ..config import FULL, IndexCacheConfig
from ..detection.layers import layer_key, spelled_container
from ..rewrite.indices_io import CallAction

__all__ = ["CallAction", "Fallback", "LayerCall", "LayerMap", "Timeline", "CrossGraphCallable", "NumberedGraphCallable"]

#: Switch for tests (and an escape hatch): False makes every qualifying graph run as it is.
ENABLED = True


class Fallback(str, enum.Enum):
    """Why a layer marked S computed instead of reading its F layer's indices."""

    NOT_PUBLISHED = "its F layer did not publish in this forward call"
    NOT_CONSECUTIVE = "the layers since its F layer's publish did not run consecutively up to this one"
    MISMATCH = "the published indices' shape, dtype, device or layout differ from what this graph expects"
    OTHER_FRAME = (
        "the published indices name other tokens than this layer's would: its score's keys or rows, or the positions "
        "it maps its indices to, come from its tokens otherwise (detection/index_frame.py), or rest on an attribute "
        "of the graph that chooses positions"
    )
    NO_FORWARD_CALL = (
        "the model's forward is not running (the compiled callable is another method, or a stage called on its "
        "own): no call boundary ties an F layer's publish to this call, so another input's indices could be read"
    )
    SECOND_PASS = (
        "the layers ran more than once in this forward call (interleaved micro-batches, a loop over the layers): "
        "which pass an F layer's publish belongs to cannot be told"
    )


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One layer's latest call through a cross-graph layer graph."""

    layer: int
    container: str  # the module path holding the numbered layers ("layers", "model.layers")
    marked: str  # "F" or "S" under the graph's config
    action: CallAction
    graph: str  # dynamo's compile id of the graph that ran
    source_layer: int | None = None  # READ: the F layer whose indices were read
    source_graph: str | None = None  # READ: the graph that published them
    fallback: Fallback | None = None  # COMPUTED while marked S: why


# ---------------------------------------------------------------------------------------------- layer map


@dataclasses.dataclass
class _Published:
    indices: torch.Tensor
    key_width: int  # the width of the key axis the F layer's top-k ran over
    graph: str
    frame: str | None  # the F layer's ``IndexFrame.portable()``: what its indices name


#: Static index buffers kept per timeline (one per indices shape): bounded, so dynamic prefill lengths
#: do not grow memory without end. A buffer dropped here is allocated again when its shape comes back
#: (under CUDA graphs: a new address, so that graph records again).
_BUFFERS_KEPT = 8


@dataclasses.dataclass
class Timeline:
    """Host bookkeeping for one layer container of one model: which layers ran, what was published."""

    last: int | None = None  # the layer that ran last in this forward call
    run_from: int | None = None  # layers run_from..last ran consecutively
    published: dict[int, _Published] = dataclasses.field(default_factory=dict)
    calls: dict[int, LayerCall] = dataclasses.field(default_factory=dict)  # this forward call's
    buffers: dict[tuple, torch.Tensor] = dataclasses.field(default_factory=dict)  # kept across calls
    in_forward: bool = False  # the model's forward is running (its pre-hook ran, its post-hook not yet)
    second_pass: bool = False  # a layer at or below the last one ran again within this forward call
    writer: int | None = None  # the last F layer that computed in this pass: what the engines' buffer holds
    tail_open: bool = False  # the last graph ended in a layer it ran without an indexer (see ``begin``)

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               avoid: torch.Tensor | None = None) -> torch.Tensor:
        """The static buffer F layers of this shape publish into: the same tensor (address) on every call.

        ``avoid``: the buffer the same graph reads (a numbered graph that reads and publishes): the other of
        two buffers is given then, since a compiled graph assumes its inputs do not alias.
        """
        key = (tuple(shape), dtype, device, 0)
        if avoid is not None and self.buffers.get(key) is avoid:
            key = (*key[:3], 1)
        found = self.buffers.pop(key, None)
        if found is None:
            found = torch.empty(shape, dtype=dtype, device=device)
            while len(self.buffers) >= _BUFFERS_KEPT:
                self.buffers.pop(next(iter(self.buffers)))
        self.buffers[key] = found  # most recently used last
        return found

    def _continues(self, layer: int) -> bool:
        """Whether ``layer`` goes on with the layer the last graph ended in: one it ran without an indexer, which
        a graph break may have split (its first ops there, its indexer here)."""
        return self.tail_open and self.last == layer

    def readable(self, source: int, layer: int) -> _Published | Fallback:
        """What layer ``layer`` (not yet begun) may read from ``source``, or why it may not.

        A read is proven only inside one call of the model's forward, on its first pass over the layers, from
        an F layer that published in that pass with every layer since run consecutively."""
        if not self.in_forward:
            return Fallback.NO_FORWARD_CALL
        behind = self.last is not None and self.last >= layer and not self._continues(layer)
        if self.second_pass or behind:
            return Fallback.SECOND_PASS
        if self.last is None or source not in self.published:
            return Fallback.NOT_PUBLISHED
        if (self.last != layer - 1 and not self._continues(layer)) or self.run_from > source:
            return Fallback.NOT_CONSECUTIVE
        return self.published[source]

    def begin(self, layer: int, through: int | None = None, open_end: bool = False) -> None:
        """Layers ``layer..through`` (one graph's span; ``through`` defaults to ``layer``) run now; ``open_end``:
        the graph ran its last layer without an indexer (the next graph may hold the rest of that layer)."""
        continues = self._continues(layer)
        if self.last is not None and layer <= self.last and not continues:  # a lower layer again: a new pass
            self.restart()
            self.second_pass = True
        if self.last is None or (layer != self.last + 1 and not continues):
            self.run_from = layer
        self.last = layer if through is None else through
        self.tail_open = open_end

    def restart(self) -> None:
        """Nothing published before may be read any more."""
        self.last = self.run_from = self.writer = None
        self.tail_open = False
        self.published.clear()

    def new_forward(self) -> None:
        """A new call of the model: restart, and forget the previous call's records."""
        self.restart()
        self.calls = {}
        self.in_forward, self.second_pass = True, False

    def end_forward(self) -> None:
        """The model's forward returned: nothing published in it may be read any more (``readable`` refuses every
        read until the next call opens; the records stay for ``layer_calls``)."""
        self.in_forward = False


class LayerMap:
    """A model's parameters by storage: ``data_ptr`` → the (container, layer) that owns it, per model.

    A parameter listed under two layers (tied weights) maps to none. ``timelines`` holds the model's
    host bookkeeping, one per layer container and thread (two threads running the model at once must
    never read each other's indices), shared by every graph compiled for it. A forward pre-hook and an
    always-called forward hook on the model (run eagerly, outside every graph) open and close each call of
    its forward: reads are proven only inside one such call, so a span of layers run through another method,
    or a stage called on its own, computes rather than read another input's indices.
    Owned by an ``IndexCacheSession`` (one per model there).

    An entry vouches for a storage only while its parameter still holds it: ``param.data = other`` (a swap of
    two layers' weights, a reload by assignment) leaves the old address to another layer's parameter or to an
    activation, so every lookup checks the entry's parameter against the address and re-indexes the model
    before it answers, where one no longer matches (``stale_reindexed`` counts those lookups).
    """

    def __init__(self, root: nn.Module) -> None:
        self._root = weakref.ref(root)
        self.stale_reindexed = 0
        self.by_storage: dict[int, tuple[torch.Tensor, tuple[str, int] | None]] = {}
        self.timelines: dict[tuple[str, int], Timeline] = {}
        self.hooked = False
        #: per thread: whether the model's forward is running. A map made during a compile inside the model's
        #: forward (its hooks were not there yet when this call began) starts open.
        self.forward_open: dict[int, bool] = {threading.get_ident(): forward_running(root)}
        self.refresh(root)

    @staticmethod
    def _index(root: nn.Module) -> dict[int, tuple[torch.Tensor, tuple[str, int] | None]]:
        """Per parameter storage, the parameter and its (container, layer), None when two layers hold it.

        Each module counts once, under its first name (``named_modules``): a block that a second list also holds
        (a hybrid model's ``dsa_layers``) keeps its place in the list that owns it, as layer numbers do in the
        graphs (``frame_locals.py``). A parameter two modules hold (tied weights) gets each module's name, and
        two layers' names make it no layer's."""
        found: dict[int, tuple[torch.Tensor, tuple[str, int] | None]] = {}
        named = ((f"{prefix}.{name}" if prefix else name, param) for prefix, module in root.named_modules()
                 for name, param in module.named_parameters(recurse=False))
        for path, param in named:
            key = layer_key(path)
            if key is None or param.numel() == 0 or param.device.type == "meta":
                continue
            ptr = param.data_ptr()
            earlier = found.get(ptr)
            found[ptr] = (param, key if earlier is None or earlier[1] == key else None)
        return found

    def refresh(self, root: nn.Module) -> None:
        """Re-index when the parameters moved (``model.to(...)``) or were replaced since; hook the model once."""
        fresh = self._index(root)
        if {ptr: key for ptr, (_, key) in fresh.items()} != {ptr: key for ptr, (_, key) in self.by_storage.items()}:
            self.by_storage = fresh
            for timeline in self.timelines.values():
                timeline.restart()
        if self.by_storage and not self.hooked:
            owner = weakref.ref(self)
            root.register_forward_pre_hook(_forward_hook(owner, opens=True))
            root.register_forward_hook(_forward_hook(owner, opens=False), always_call=True)
            self.hooked = True

    def _this_thread(self) -> list[Timeline]:
        thread = threading.get_ident()
        return [timeline for (_, owner), timeline in self.timelines.items() if owner == thread]

    def new_forward(self) -> None:
        """A new call of the model's forward in this thread."""
        self.forward_open[threading.get_ident()] = True
        for timeline in self._this_thread():
            timeline.new_forward()

    def end_forward(self) -> None:
        """The model's forward returned (or raised) in this thread."""
        self.forward_open[threading.get_ident()] = False
        for timeline in self._this_thread():
            timeline.end_forward()

    def layer_of(self, args: Sequence[object]) -> tuple[str, int] | None:
        """The one (container, layer) every parameter among ``args`` belongs to, or None."""
        found = self.layers_in(args)
        if not found or len(found) != 1:
            return None
        ((container, layers),) = found.items()
        return (container, next(iter(layers))) if len(layers) == 1 else None

    def layers_in(self, args: Sequence[object], *, reindexed: bool = False) -> dict[str, set[int]] | None:
        """Per layer container, the layers whose parameters are among ``args``; None if a parameter is tied to
        two layers or arrives with another shape or dtype than the model's. Read from current entries only: where
        an entry's parameter has left its address since the model was indexed, the model is indexed again first
        (and None where it is gone, or still stale after that)."""
        found: dict[str, set[int]] = {}
        for arg in args:
            if not isinstance(arg, torch.Tensor):
                continue
            ptr = arg.data_ptr()
            entry = self.by_storage.get(ptr)
            if entry is None:
                continue
            param, key = entry
            if param is not arg and param.data_ptr() != ptr:
                if reindexed:
                    return None
                self.stale_reindexed += 1
                root = self._root()
                if root is None:
                    return None
                self.refresh(root)
                return self.layers_in(args, reindexed=True)
            if key is None or arg.shape != param.shape or arg.dtype != param.dtype:
                return None
            found.setdefault(key[0], set()).add(key[1])
        return found

    def timeline(self, container: str) -> Timeline:
        """This thread's bookkeeping for ``container``."""
        thread = threading.get_ident()
        found = self.timelines.get((container, thread))
        if found is None:
            found = self.timelines[(container, thread)] = Timeline(in_forward=self.forward_open.get(thread, False))
        return found

    def calls(self) -> list[LayerCall]:
        """What this thread's latest forward call did, per layer."""
        calls = [call for timeline in self._this_thread() for call in timeline.calls.values()]
        return sorted(calls, key=lambda call: (call.container, call.layer))


def _forward_hook(owner: weakref.ref, *, opens: bool) -> Callable:
    @torch._dynamo.disable
    def forward_boundary(module, *args) -> None:
        found = owner()
        if found is not None:
            found.new_forward() if opens else found.end_forward()

    return forward_boundary


_FORWARD_FRAMES = ("forward", "_call_impl", "_wrapped_call_impl", "__call__")


def _modules_calling() -> Iterator[tuple[str, nn.Module]]:
    """(function name, module) for every Python frame on this thread's stack whose ``self`` is a module, innermost
    first (``torch.compile``'s wrapper unwrapped to the module it compiles)."""
    frame = sys._getframe(1)  # the frames of the helpers below hold no module: walking them costs nothing
    while frame is not None:
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(owner, nn.Module):
            yield frame.f_code.co_name, getattr(owner, "_orig_mod", owner)
        frame = frame.f_back


def forward_running(root: nn.Module) -> bool:
    """Whether a call of ``root``'s forward (or its ``__call__``) is on this thread's Python stack."""
    return any(module is root and name in _FORWARD_FRAMES for name, module in _modules_calling())


def modules_on_stack() -> list[nn.Module]:
    """The ``nn.Module`` ``self`` of every Python frame calling us, outermost first: the model whose layer this
    graph is, among them."""
    found: dict[int, nn.Module] = {}
    for _, module in _modules_calling():
        found.setdefault(id(module), module)
    return list(reversed(found.values()))


# ---------------------------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class ExpectedIndices:
    """The indices one call of a layer graph makes or takes: their (symbolic) shape and the width of the key
    axis they index, bound to the call's own input sizes, plus dtype and device.

    The key width matters as much as the shape: a decode step's indices point into ``past + new`` keys, so
    indices taken over another cache length would select other keys (or none).
    """

    sizes: tuple[int | sympy.Expr, ...]  # the indices' shape, then the scored key axis's width
    bindings: tuple[tuple[sympy.Symbol, int, int | None], ...]  # symbol, argument, dim (None: a SymInt arg)
    dtype: torch.dtype
    device: torch.device
    #: What the indices name, comparable across graphs (``IndexFrame.portable``); None: it rests on an attribute of
    #: this graph that chooses positions, so no published indices are taken.
    frame: str | None

    def sizes_for(self, args: Sequence[object]) -> tuple[int, ...]:
        if not self.bindings:
            return self.sizes  # type: ignore[return-value]
        values = {}
        for symbol, position, dim in self.bindings:
            arg: Any = args[position]  # a SymInt-bound int, or a tensor whose dim ``dim`` is bound
            values[symbol] = int(arg if dim is None else arg.shape[dim])
        return tuple(size if isinstance(size, int) else int(size.xreplace(values)) for size in self.sizes)

    def refusal(self, published: _Published, args: Sequence[object]) -> Fallback | None:
        """Why ``published`` may not stand in for what this call would compute: another frame, or another shape,
        dtype, device or layout; None where it may."""
        if self.frame is None or published.frame != self.frame:
            return Fallback.OTHER_FRAME
        return None if self.accepts(published, args) else Fallback.MISMATCH

    def accepts(self, published: _Published, args: Sequence[object]) -> bool:
        """Whether ``published`` is exactly what this call would have computed the shape of."""
        indices = published.indices
        if indices.dtype != self.dtype or indices.device != self.device or not indices.is_contiguous():
            return False
        return (*indices.shape, published.key_width) == self.sizes_for(args)


# ---------------------------------------------------------------------------------------------- the callable


#: How often one callable looks on the Python stack for a model its calls' parameters belong to, after
#: the models it knows did not match: bounded, so a graph called with no model's layers stays cheap.
_STACK_WALKS = 16


class _ModelLookup:
    """Finds, per call, which known model (layer map) the call's parameters belong to."""

    def __init__(self, maps: list[LayerMap], session) -> None:
        self.maps, self.session = maps, session  # the session owns the models' layer maps
        self._stack_walks_left = _STACK_WALKS

    def _find(self, args, match: Callable[[LayerMap, Sequence[object]], object]):
        """``(layer map, match(map, args))`` for the first map where ``match`` is not None, else None."""
        for candidate in self.maps:
            key = match(candidate, args)
            if key is not None:
                return candidate, key
        if self._stack_walks_left > 0:  # another model of the same class, say: look for it once on the stack
            self._stack_walks_left -= 1
            known = {id(candidate) for candidate in self.maps}
            for root in modules_on_stack():
                candidate = self.session.layer_map(root)  # re-indexed if its parameters moved
                key = match(candidate, args)
                if key is not None:
                    if id(candidate) not in known:
                        self.maps.append(candidate)
                    return candidate, key
        return None


def publish_buffer(timeline: Timeline, expected: ExpectedIndices, args: Sequence[object],
                   avoid: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The static buffer this call's F layer writes its indices into, and the key width they index."""
    *shape, key_width = expected.sizes_for(args)
    return timeline.buffer(tuple(shape), expected.dtype, expected.device, avoid), key_width


class CrossGraphCallable(_ModelLookup):
    """The boxed callable the backend returns for a layer graph that runs as several layers."""

    _boxed_call = True

    def __init__(self, as_is: Callable, f_variant: Callable, s_variant: Callable, expected: ExpectedIndices,
                 config: IndexCacheConfig, maps: list[LayerMap], graph: str, session) -> None:
        super().__init__(maps, session)
        self.as_is, self.f_variant, self.s_variant = as_is, f_variant, s_variant
        self.expected, self.config, self.graph = expected, config, graph

    def __call__(self, args: list) -> object:
        found = self._find(args, LayerMap.layer_of) if ENABLED else None
        if found is None:
            return self.as_is(args)
        layer_map_, (container, layer) = found
        timeline = layer_map_.timeline(container)
        try:
            return self._run(args, timeline, container, layer)
        except BaseException:
            timeline.restart()
            raise

    def _run(self, args: list, timeline: Timeline, container: str, layer: int):
        marked = self.config.layer_kind(layer)
        source = self.config.source_layer(layer) if marked != FULL else None
        if marked != FULL and source is None:  # the one-buffer rule: the nearest layer that computed, if any
            earlier = [published for published in timeline.published if published < layer]
            source = max(earlier) if earlier else None
        if marked == FULL or source is None:  # an S layer with nothing computed before it computes, and writes
            timeline.begin(layer)
            buffer, key_width = publish_buffer(timeline, self.expected, args)
            result = self.f_variant([*args, buffer])
            timeline.published[layer] = _Published(buffer, key_width, self.graph, self.expected.frame)
            timeline.calls[layer] = LayerCall(layer, container, marked, CallAction.PUBLISHED, self.graph)
            return result
        why = timeline.readable(source, layer)
        if isinstance(why, _Published):
            refusal = self.expected.refusal(why, args)
            if refusal is None:
                timeline.begin(layer)
                call = LayerCall(layer, container, marked, CallAction.READ, self.graph, source, why.graph)
                timeline.calls[layer] = call
                return self.s_variant([*args, why.indices])
            why = refusal
        timeline.begin(layer)
        timeline.calls[layer] = LayerCall(layer, container, marked, CallAction.COMPUTED, self.graph, fallback=why)
        return self.as_is(args)


@dataclasses.dataclass(frozen=True)
class NumberedSpan:
    """What a graph whose layers the pass numbered exchanges with the model's other graphs.

    ``layers``: its indexer layers, in order. ``covers``: the first and last layer it runs (layers without an
    indexer included). ``reads``: its leading S layers, which read the buffer an earlier graph's F layer wrote,
    with the indices each expects; ``publishes``: its last F layer, which an S layer past this graph needs, with
    the indices it makes. ``writes``: its last F layer (the buffer's writer once it ran), published or not.
    """

    layers: tuple[int, ...]
    container: str | None  # from the module paths; None: found from the parameters alone
    reads: tuple[tuple[int, ExpectedIndices], ...] = ()
    publishes: tuple[int, ExpectedIndices] | None = None
    covers: tuple[int, int] | None = None
    writes: int | None = None

    def span(self) -> tuple[int, int]:
        return self.covers if self.covers is not None else (self.layers[0], self.layers[-1])

    def open_end(self) -> bool:
        """Whether the span ends in a layer the graph runs without an indexer."""
        return self.span()[1] > self.layers[-1]


class NumberedGraphCallable(_ModelLookup):
    """The boxed callable for a numbered graph that reads or publishes indices across a graph break.

    ``variant`` is the graph with its leading S layers fed from an extra input (the published indices,
    when ``span.reads``) and its publishing F layer's indices written into an extra input (the static
    buffer, when ``span.publishes``), in that order; ``as_is`` the graph the pass made. The variant runs
    only when every leading S layer may read; otherwise the graph runs as it is (and publishes nothing).
    """

    _boxed_call = True

    def __init__(self, as_is: Callable, variant: Callable, span: NumberedSpan, maps: list[LayerMap],
                 graph: str, session) -> None:
        super().__init__(maps, session)
        self.as_is, self.variant, self.span, self.graph = as_is, variant, span, graph

    def _container(self, layer_map_: LayerMap, args) -> str | None:
        """The container whose layers this call's parameters are: they hold every indexer layer of the span and
        nothing further than one layer outside it (a layer split by the break)."""
        found = layer_map_.layers_in(args)
        if not found:
            return None
        first, last = self.span.span()
        low, high = first - 1, last + 1
        fits = [name for name, layers in found.items() if set(self.span.layers) <= layers
                and all(low <= layer <= high for layer in layers)
                and self.span.container in (None, spelled_container(name))]
        return fits[0] if len(fits) == 1 else None

    def __call__(self, args: list) -> object:
        found = self._find(args, self._container) if ENABLED else None
        if found is None:
            return self.as_is(args)
        layer_map_, container = found
        timeline = layer_map_.timeline(container)
        try:
            return self._run(args, timeline, container)
        except BaseException:
            timeline.restart()
            raise

    def _readable(self, timeline: Timeline, args) -> _Published | Fallback:
        span = self.span
        if timeline.writer is None:
            return Fallback.NOT_PUBLISHED
        why = timeline.readable(timeline.writer, span.span()[0])
        if isinstance(why, _Published):
            refusal = next((found for _, expected in span.reads if (found := expected.refusal(why, args))), None)
            return refusal if refusal is not None else why
        return why

    def _run(self, args: list, timeline: Timeline, container: str):
        span, extra = self.span, []
        read = self._readable(timeline, args) if span.reads else None
        source = timeline.writer
        if isinstance(read, Fallback):
            timeline.begin(*span.span(), span.open_end())
            for layer, _ in span.reads:
                timeline.calls[layer] = LayerCall(layer, container, "S", CallAction.COMPUTED, self.graph,
                                                  fallback=read)
            # the leading S layers computed: the last of them writes the buffer, unless an F layer after them does
            timeline.writer = span.writes if span.writes is not None else span.reads[-1][0]
            return self.as_is(args)
        if read is not None:
            extra.append(read.indices)
        timeline.begin(*span.span(), span.open_end())
        if span.publishes is not None:
            avoid = None if read is None else read.indices
            buffer, key_width = publish_buffer(timeline, span.publishes[1], args, avoid)
            extra.append(buffer)
        result = self.variant([*args, *extra])
        for layer, _ in span.reads:
            timeline.calls[layer] = LayerCall(layer, container, "S", CallAction.READ, self.graph, source,
                                              read.graph)
        if span.writes is not None:
            timeline.writer = span.writes
        if span.publishes is not None:
            layer = span.publishes[0]
            timeline.published[layer] = _Published(buffer, key_width, self.graph, span.publishes[1].frame)
            timeline.calls[layer] = LayerCall(layer, container, "F", CallAction.PUBLISHED, self.graph)
        return result
