"""A graph whose layer numbers rest on which blocks a compiled function holds runs only for those blocks.

dynamo guards a module list by its length and its blocks' types, not by identity: a compiled function that loops
over a list it holds (an argument, a closure cell, a global: ``run(model, model.layers[1:3], x)``) runs the graph it
compiled for one list on any other list of that length, and the closures of one code object share their graphs.
The layer numbers the pass proved for the first list's blocks (their positions in the model, ``frame_locals``)
would then be applied to other layers: layers 1 and 2 would run as the graph decided for layers 0 and 1.

The rule: wherever the blocks behind a graph's module paths are reached through a module list the compiled frame
holds, the backend asks dynamo to guard the identity of one tensor of each of those blocks (a parameter, else a
buffer), so another list recompiles and its numbers are proven again. The pass's ``uuid()`` is then None, so
Inductor's FX graph cache is bypassed: its key covers the graph's code and module paths (``L.blocks.0`` for any
slice) but not which layers the blocks are. Paths through a module's own lists (``L['model'].layers[3]``) are
structural, the same for every model of that class, and are not pinned.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..detection.graph_inputs import current_graphargs, source_name
from ..detection.layers import normalise_module_path


#: The dicts a dynamo source reads a submodule or tensor through (``L['blocks']._modules['0']``).
_MODULE_DICTS = re.compile(r"\._(modules|parameters|buffers)(?=\.)")


def pin_listed_blocks(frame_modules: Mapping[str, object]) -> tuple[str, ...]:
    """Guard the identity of one tensor of each numbered block reached through a module list among
    ``frame_modules`` (keyed by root: ``frames.compiled_frame_modules``): a parameter where the block's parameters
    are graph inputs, else a buffer (weights a quantized checkpoint keeps as buffers). Returns the guarded
    tensors' names as dynamo spells them; () where no list is held, no tensor of its blocks is a graph input
    (dynamo then guards the modules themselves), or no dynamo compile is in progress."""
    lists = [root for root, module in frame_modules.items() if isinstance(module, (nn.ModuleList, nn.Sequential))]
    graphargs = current_graphargs() if lists else None
    if graphargs is None:
        return ()
    try:
        from torch._dynamo.guards import GuardBuilder
        from torch._guards import TracingContext

        guards = TracingContext.get().guards_context.dynamo_guards
    except Exception:  # noqa: BLE001 - not inside a dynamo compile, or a torch without these internals
        return ()
    numbered = [re.compile(re.escape(root) + r"\.(\d+)\.") for root in lists]
    chosen: dict[tuple[int, str], tuple[bool, str, Any]] = {}  # block -> (is a parameter, name, dynamo source)
    for arg in graphargs:
        source, example = getattr(arg, "source", None), getattr(arg, "example", None)
        name = source_name(source)
        if name is None or not isinstance(example, torch.Tensor):
            continue
        path = _MODULE_DICTS.sub("", normalise_module_path(name))  # L.blocks._modules.0 -> L.blocks.0
        for which, pattern in enumerate(numbered):
            block = pattern.match(path)
            if block is None:
                continue
            key, is_parameter = (which, block.group(1)), isinstance(example, nn.Parameter)
            if key not in chosen or (is_parameter and not chosen[key][0]):
                chosen[key] = (is_parameter, name, source)
    for _, _, source in chosen.values():
        guards.add(source.make_guard(GuardBuilder.ID_MATCH))
    return tuple(name for _, name, _ in chosen.values())

