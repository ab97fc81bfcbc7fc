"""Detect vLLM's opaque lightning-indexer op and make S layers skip it.

vLLM runs each DSA layer's indexer as one custom op, ``vllm::sparse_attn_indexer`` (or its
ROCm twin), that writes the top-k into a model-wide ``topk_indices_buffer`` and returns
nothing the model reads. In a functionalized post-grad graph the call sits inside
``auto_functionalized`` (v1: the buffer is a keyword argument, its new version is output 1)
or ``auto_functionalized_v2`` (the buffer is one of ``_all_bases``, its new version is
output ``1 + base index``). Each layer's call takes the version the previous call produced;
a final ``copy_`` writes the last version back, and attention reads the buffer outside the
graph. So "layer S reuses layer F's indices" means: S's call is taken out of that chain,
every reader of the version S produced reads the version S received instead, and S's call,
with the indexer key-cache insert it does inside, becomes dead code.

Matching is by operator name, so this module never imports vLLM.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from ..graph_utils import fake_value, getitem_users, same_size
from .layers import module_path, normalise_module_path
from .registry import register_site_finder
from .sites import IndexerSite, TopkVerdict, same_arguments

#: Qualified names of vLLM ops that compute an indexer top-k into ``topk_indices_buffer``.
INDEXER_OPS = ("vllm::sparse_attn_indexer", "vllm::rocm_aiter_sparse_attn_indexer")
BUFFER = "topk_indices_buffer"

_HOPS = {
    torch.ops.higher_order.auto_functionalized: "auto_functionalized",
    torch.ops.higher_order.auto_functionalized_v2: "auto_functionalized_v2",
}
INPLACE = "in-place call"

#: Arguments two layers must agree on for one's buffer contents to stand in for the other's.
_SAME = ("topk_tokens", "head_dim", "dcp_world_size", "dcp_rank", "use_pcp")


def _op_name(target) -> str | None:
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else None


def _is_indexer_op(target) -> bool:
    return _op_name(target) in INDEXER_OPS


def _schema_defaults(op) -> dict:
    """The schema's default values, so a keyword the caller left out still compares."""
    return {a.name: a.default_value for a in op._schema.arguments if a.has_default_value()}


def _vllm_layer_name(value) -> str | None:
    """The vLLM layer name behind ``k_cache_prefix``: a str, a ``LayerName``, or a graph input holding one."""
    if isinstance(value, fx.Node):
        value = fake_value(value)
        value = getattr(value, "real_obj", value)  # a FakeScriptObject wraps the hoisted LayerName
    value = getattr(value, "value", value)
    return value if isinstance(value, str) and value else None


@dataclasses.dataclass(eq=False)
class VllmIndexerSite(IndexerSite):
    """One ``vllm::sparse_attn_indexer`` call; ``indices`` is the buffer version it produces."""

    form: str = ""  # "auto_functionalized", "auto_functionalized_v2" or INPLACE
    op: object = None  # the OpOverload inside the wrapper

    kind = "vllm.sparse_attn_indexer"
    #: The op carries vLLM's registered layer name (``model.layers.9.self_attn.indexer...``): the engine's own
    #: global decoder-layer index, authoritative over where the toy or real model consumes the buffer.
    names_its_layer = True

    # Read from the node each time: rewiring an earlier layer changes what this call receives.
    @property
    def arguments(self) -> dict:
        """The op's arguments by name, schema defaults filled in."""
        return _arguments(self.anchor, self.form, self.op)

    @property
    def buffer_in(self) -> fx.Node | None:
        """The buffer version this call receives."""
        return _buffer_in(self.anchor, self.form, self.op)

    # ------------------------------------------------------------------ checks
    def refusal(self) -> str | None:
        if self.form == INPLACE:
            return "the indexer op is called in place (graph not functionalized): no buffer versions to rewire"
        if self.buffer_in is None:
            return "the top-k buffer passed to the op is not a tensor in the graph"
        if any(returned.users for returned in getitem_users(self.anchor, 0)):
            return "the op's return value is read in the graph; only the buffer version can be redirected"
        arguments = self.arguments
        if arguments.get("candidate_blocks") is not None or arguments.get("candidate_write"):
            return "the op reads or writes candidate blocks (two-level selection): it does more than fill the buffer"
        if self.form == "auto_functionalized_v2" and len(self.anchor.kwargs.get("_all_bases", ())) != 1:
            return "the op mutates more than the top-k buffer"
        return None

    def incompatibility(self, source: IndexerSite, sizes=None) -> str | None:
        if not isinstance(source, VllmIndexerSite):
            return f"layer {source.layer} is a {source.kind} site, this is a {self.kind} site"
        if source.op is not self.op:
            return f"layer {source.layer} calls {_op_name(source.op)}, this layer {_op_name(self.op)}"
        received = self.buffer_in
        if received is not source.indices:
            writer = received.args[0] if received is not None and received.args else None
            between = f" ({writer.name} writes it)" if isinstance(writer, fx.Node) else ""
            return (
                f"the top-k buffer this layer receives is not the version layer {source.layer} produced: "
                f"another write lies between{between}"
            )
        mine, theirs = self.arguments, source.arguments
        for name in _SAME:
            if not same_arguments(mine.get(name), theirs.get(name)):
                return f"{name}={mine.get(name)} differs from layer {source.layer}'s"
        mine, theirs = fake_value(mine["hidden_states"]), fake_value(theirs["hidden_states"])
        if mine is None or theirs is None:
            return "hidden states carry no shape metadata to compare token counts"
        if not same_size(mine.shape[0], theirs.shape[0]):
            return f"{mine.shape[0]} tokens here, {theirs.shape[0]} in layer {source.layer}: the buffer rows differ"
        return None

    def inserts_keys_itself(self) -> bool:
        return not self.arguments.get("skip_k_cache_insert", True)

    # ------------------------------------------------------------------ rewrite
    def reuse(self, source: IndexerSite) -> None:
        """Take this call out of the buffer's version chain; its readers see what it received."""
        received = self.buffer_in
        assert received is source.indices
        self.indices.replace_all_uses_with(received)


def _arguments(node: fx.Node, form: str, op) -> dict:
    if form == INPLACE:
        names = [a.name for a in op._schema.arguments]
        return {**_schema_defaults(op), **dict(zip(names, node.args)), **node.kwargs}
    return {**_schema_defaults(op), **node.kwargs}


def _buffer_in(node: fx.Node, form: str, op) -> fx.Node | None:
    if form == "auto_functionalized_v2":
        base = node.kwargs.get(f"_{BUFFER}_base_index")
        bases = node.kwargs.get("_all_bases", [])
        value = bases[base] if base is not None and base < len(bases) else None
    else:
        value = _arguments(node, form, op).get(BUFFER)
    return value if isinstance(value, fx.Node) else None


def _buffer_output(node: fx.Node, form: str, op) -> int | None:
    """Which output of the wrapper is the buffer's new version."""
    if form == "auto_functionalized":
        mutated = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        return 1 + mutated.index(BUFFER)
    base = node.kwargs.get(f"_{BUFFER}_base_index")
    return None if base is None else 1 + base


def _site(node: fx.Node) -> VllmIndexerSite | None:
    if node.op != "call_function":
        return None
    form = _HOPS.get(node.target)
    if form is not None:
        if not node.args or not _is_indexer_op(node.args[0]):
            return None
        op = node.args[0]
        output = _buffer_output(node, form, op)
        readers = getitem_users(node, output)
        if output is None or len(readers) != 1:
            return None  # nothing reads the new buffer version: Inductor would already drop the call
        indices = readers[0]
    elif _is_indexer_op(node.target):
        form, op, indices = INPLACE, node.target, node
    else:
        return None

    layer_name = _vllm_layer_name(_arguments(node, form, op).get("k_cache_prefix"))
    traced = module_path(node)
    path = normalise_module_path(layer_name) if layer_name else traced
    evidence = [f"{_op_name(op)} in {form}"]
    if layer_name:
        evidence.append(f"vLLM layer {layer_name!r}")
    if traced:
        evidence.append(f"module path {traced!r}")
    return VllmIndexerSite(
        anchor=node, indices=indices, module_path=path, evidence=tuple(evidence), form=form, op=op
    )


def find_vllm_indexer_sites(graph: fx.Graph) -> tuple[list[IndexerSite], list[TopkVerdict]]:
    """Every vLLM indexer-op call in ``graph``, in graph order."""
    sites: list[IndexerSite] = []
    for node in graph.nodes:
        site = _site(node)
        if site is not None:
            sites.append(site)
    return sites, []


register_site_finder("vllm.sparse_attn_indexer", find_vllm_indexer_sites)
