"""Graph surgery that feeds a layer's indices in from outside, or hands them out: the cross-graph variants and the
``nested_compile_region`` bodies are built from these.

A graph that reads published indices must never hand the published tensor itself back to its caller: the
buffer is written again by the next F layer that publishes (in the same call or the next), and a model that
keeps an earlier layer's indices would then see them change under it. ``read_indices`` therefore gives every
output that would alias the input a copy of its own.
"""

from __future__ import annotations

import enum

import torch
from torch import fx

from ..detection.registry import detect
from ..graph_utils import VIEW_LIKE, fake_value, is_call


class CallAction(str, enum.Enum):
    """What one call of a layer graph (or a region body) did with its indices."""

    PUBLISHED = "computed its indices and published them"
    READ = "read its F layer's published indices (indexer not run)"
    COMPUTED = "computed its own indices (graph as it is)"


def new_input(graph: fx.Graph, name: str, example: torch.Tensor) -> fx.Node:
    """A placeholder after the last one (the callers pass its value last)."""
    with graph.inserting_after(graph.find_nodes(op="placeholder")[-1]):
        node = graph.placeholder(name)
    node.meta["val"] = example
    return node


def example_indices(site) -> torch.Tensor:
    indices = fake_value(site.indices)
    with indices.fake_mode:
        return torch.empty(indices.shape, dtype=indices.dtype, device=indices.device)


def write_indices(module: fx.GraphModule, site) -> fx.GraphModule:
    """``module`` (edited in place) with one more, last input, a buffer it copies ``site``'s indices into: the
    static buffer the wrapper publishes (a mutated input keeps a fixed address under CUDA graphs)."""
    graph = module.graph
    buffer = new_input(graph, "publish_into", example_indices(site))
    with graph.inserting_before(graph.find_nodes(op="output")[0]):
        graph.call_function(torch.ops.aten.copy_.default, (buffer, site.indices))
    graph.lint()
    module.recompile()
    return module


def with_indices_output(module: fx.GraphModule) -> fx.GraphModule:
    """``module`` (edited in place) with its single indexer's indices as one more, last output (a region body,
    whose outputs stay inside the outer graph)."""
    site = detect(module.graph).sites[0]
    (output,) = module.graph.find_nodes(op="output")
    outs = output.args[0]
    output.args = (type(outs)((*outs, site.indices)),)
    module.recompile()
    return module


def with_indices_input(module: fx.GraphModule, example: torch.Tensor) -> tuple[fx.GraphModule, int] | None:
    """``module`` taking its single indexer's indices as one more, last input, and the nodes that became dead."""
    removed = read_indices(module, detect(module.graph).sites, example)
    return None if removed is None else (module, removed)


def read_indices(module: fx.GraphModule, sites, example: torch.Tensor) -> int | None:
    """Feed ``sites``' consumers from one more, last input (published indices) and drop what became dead, in place;
    the number of nodes removed, or None if an indexer stays needed (then ``module`` is spoilt)."""
    graph = module.graph
    before = len(graph.nodes)
    published = new_input(graph, "published_indices", example)
    for site in sites:
        site.indices.replace_all_uses_with(published)
    _copy_escaping_outputs(graph, published)
    graph.eliminate_dead_code()
    alive = set(graph.nodes)
    if any(site.anchor in alive for site in sites):
        return None
    graph.lint()
    module.recompile()
    return before + 1 - len(graph.nodes)




def _copy_escaping_outputs(graph: fx.Graph, published: fx.Node) -> None:
    """Where ``published`` (or a view of it) is a graph output, output a clone instead (see the module docstring)."""
    (output,) = graph.find_nodes(op="output")
    escaping, frontier = set(), [published]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user is output:
                escaping.add(node)
            elif is_call(user, VIEW_LIKE) and user.args and user.args[0] is node:
                frontier.append(user)
    for node in escaping:
        with graph.inserting_before(output):
            owned = graph.call_function(torch.ops.aten.clone.default, (node,))
        owned.meta["val"] = fake_value(node)
        output.replace_input_with(node, owned)
