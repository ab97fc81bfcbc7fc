"""Which decoder layer a graph node belongs to, from the module path it was traced under.

torch spells ``nn_module_stack`` paths differently by version (``L['self'].model.layers.3``,
``L__self___model_layers_3``, ``getattr(L['self'].model.layers, '3')``); we normalise them
to ``model.layers.3`` and take the first all-digit component as the decoder-layer index,
which is where every transformer stack (``layers.N``, ``h.N``, ``blocks.N``) puts it.
"""

from __future__ import annotations

import re

from torch import fx

_GETATTR = re.compile(r"getattr\((.*?),\s*['\"](\w+)['\"]\)")
_SUBSCRIPT = re.compile(r"\[['\"]?(\w+)['\"]?\]")


def normalise_module_path(path: str) -> str:
    """``L['self'].model.layers[3].attn`` → ``model.layers.3.attn``."""
    previous = None
    while previous != path:
        previous, path = path, _GETATTR.sub(r"\1.\2", path)
    path = _SUBSCRIPT.sub(r".\1", path)
    for prefix in ("L.self.", "L__self___", "self."):
        if path.startswith(prefix):
            path = path[len(prefix) :]
    return path.strip(".")


def module_path(node: fx.Node) -> str | None:
    """The innermost module path ``node`` was traced under, normalised; None without one."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return normalise_module_path(str(path))


def module_types(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [getattr(t, "__name__", str(t)) for _, t in stack.values()]


def layer_index_from_path(path: str | None) -> int | None:
    """The first all-digit component of a module path: the decoder-layer index."""
    if not path:
        return None
    for part in re.split(r"[._]", path):
        if part.isdigit():
            return int(part)
    return None


def layer_key(path: str) -> tuple[str, int] | None:
    """``model.layers.3.attn.wq`` → ``("model.layers", 3)``: the same rule for a ``named_parameters()`` path.

    Those paths are always dot-separated, so unlike ``layer_index_from_path`` (which also reads torch's
    ``L__self___model_layers_3`` spelling) this splits on dots only and can name the layer container too.
    """
    parts = path.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:position]), int(part)
    return None
