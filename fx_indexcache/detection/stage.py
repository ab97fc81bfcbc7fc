"""Whether a pipeline stage's module paths number its layers globally, or from 0.

A stage told its first global decoder layer (``stage_first_layer=N``) holds its blocks in one of three ways:

* a list of its own, ``nn.ModuleList(layers[N:])``: paths ``layers.0``, ``layers.1``, shifted by N to be global;
* a container keyed by global numbers: torchtitan's ``ModuleDict`` with the other stages' layers deleted, the
  stage modules of torch.distributed.pipelining's ``pipeline()`` (their ``layers`` holds ``2`` and ``3``);
* the model's whole list, the other stages' entries weightless placeholders (vLLM's ``PPMissingLayer``).

The last two are already global. The blocks that hold weights tell the cases apart: a list of its own has a
weighted block numbered below N (its block 0), the others have none; a list as long as the model's layer count
is the whole list. Without a model object (an exported program) the paths are read as a list of its own, as
before this rule existed.
"""

from __future__ import annotations

import re

from torch import nn


def container_module(model: nn.Module, container: str) -> nn.Module | None:
    """The module at ``container`` (a path as ``layer_slot`` spells it: dots, torch's underscores read as dots)."""
    for name, module in model.named_modules():
        if re.sub(r"[._]", ".", name) == container:
            return module
    return None


def numbered_blocks(model: nn.Module, container: str) -> list[tuple[int, nn.Module]] | None:
    """The blocks of ``container`` named by a number, in order; None when the model has no such container."""
    module = container_module(model, container)
    if module is None:
        return None
    return sorted((int(name), child) for name, child in module.named_children() if name.isdigit())


def stage_paths_are_global(model: object, container: str | None, first_layer: int,
                           model_layers: int | None) -> bool:
    """Whether the module paths of a stage that starts at global layer ``first_layer`` are global already."""
    if not isinstance(model, nn.Module) or not container or first_layer == 0:
        return False
    blocks = numbered_blocks(model, container)
    if not blocks:
        return False
    if model_layers is not None and len(blocks) == model_layers:
        return True  # the whole layer list: positions are global numbers
    weighted = [number for number, block in blocks if any(True for _ in block.parameters())]
    return bool(weighted) and min(weighted) >= first_layer
