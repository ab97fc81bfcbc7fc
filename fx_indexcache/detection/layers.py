"""Which decoder layer a graph node belongs to, from the module path it was traced under.

torch spells ``nn_module_stack`` paths differently by version (``L['self'].model.layers.3``,
``L__self___model_layers_3``, ``getattr(L['self'].model.layers, '3')``); we normalise them
to ``model.layers.3`` and read a *slot* from it: the first all-digit component (the index in a
repeated-block list: ``layers.N``, ``h.N``, ``blocks.N``, but also ``indexers.N``) and the
container before it. Which slot is the decoder layer is decided by the detector from where a
site's indices are *consumed* (``consumer_slots``), not from the top-k's own list position.

A path rooted at a frame local or global other than ``self`` (``L['tail'][0]``: a resume function after a graph
break reading ``tail = self.layers[2:]``; ``L['model'].layers[3]``: a compiled function holding its model) numbers
the local's positions, which need not be the model's: the backend resolves such a container by identity
(``integrations/frame_locals.py``), and ``layer_index_from_path`` gives it no number.
"""

from __future__ import annotations

import re

from torch import fx

from ..graph_utils import VALUE_PRESERVING, is_call

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


_FRAME_LOCAL = re.compile(r"^[LG](\.|__)")


def rooted_elsewhere(path: str) -> bool:
    """Whether a normalised path starts at a frame local or global other than ``self`` (``L.rest.0``)."""
    return bool(_FRAME_LOCAL.match(path))


def layer_index_from_path(path: str | None) -> int | None:
    """The first all-digit component of a module path: the decoder-layer index."""
    if not path or rooted_elsewhere(path):
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


def spelled_container(name: str) -> str:
    """A container name as ``layer_slot`` spells it: dots and underscores both read as dots."""
    return re.sub(r"[._]", ".", name)


def layer_slot(path: str | None) -> tuple[str, int] | None:
    """``model.layers.3.attn`` → ``("model.layers", 3)``: the container and index of the first all-digit component.

    Splits on dots and underscores alike, so torch's ``model_layers_3`` spelling gives the same container."""
    if not path:
        return None
    parts = re.split(r"[._]", path)
    for position, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:position]), int(part)
    return None


def consumer_slots(indices: fx.Node) -> set[tuple[str, int]]:
    """The slots of the nodes that consume ``indices`` (seen through casts, views and copies).

    The decoder layer an indexer serves is the layer whose attention reads its indices: an indexer kept
    in its own list (``indexers.j``, j counting only the DSA layers) is called from the model's loop, but
    its indices are read inside ``layers.i``. Consumers outside every numbered module (the model's own
    code, the graph's output) tell nothing and are skipped."""
    slots: set[tuple[str, int]] = set()
    seen, frontier = {indices}, [indices]
    while frontier:
        for user in frontier.pop().users:
            if user in seen or user.op == "output":
                continue
            seen.add(user)
            if is_call(user, VALUE_PRESERVING):
                frontier.append(user)
                continue
            slot = layer_slot(module_path(user))
            if slot is not None:
                slots.add(slot)
    return slots
