"""Module-path numbers proven by the identity of the blocks they name.

dynamo writes a module's path from the variable the compiled frame reached it through, and an export from the
attribute the forward read. That path is the model's decoder-layer number only when it names the model's own layer
list. It need not: a resume function after a graph break that runs ``tail = self.layers[2:]`` traces
``L['tail'][0]`` for layer 2; a model that loops over a second list of the same blocks (``self.dsa_layers``, the DSA
layers of a hybrid stack) traces ``dsa_layers.0`` for layer 1; a compiled function holding its model traces
``L['model'].layers[3]``.

The rule: a numbered block's layer is its position in the list that owns it, the list its canonical name (the
model's first name for it, as ``state_dict`` and the engines' weight names spell it) runs through. In a backend the
compiled frame's locals (its ``self`` too) and the globals its code reads name the objects: the container is walked
to and each numbered block is looked up in the model by identity. An export lists a block reached through two lists under both names, one
tensor each: there the canonical name of a numbered block's state (its first key in the program's ``state_dict``)
gives its list and position. Where neither proves the numbers, the layers are unknown and compute.
"""

from __future__ import annotations

from typing import Any, Union

from torch import nn
from torch.export import ExportedProgram

from ..context import GraphContext
from ..detection.layers import layer_key, layer_slot, rooted_elsewhere, spelled_container
from ..detection.registry import Detection, refuse_container, renumber

Blocks = Union[nn.ModuleList, nn.Sequential]


def _module_lists(root: nn.Module) -> dict[str, Blocks]:
    return {spelled_container(name): module for name, module in root.named_modules()
            if isinstance(module, (nn.ModuleList, nn.Sequential))}


def _named_container(container: str, frame_modules: dict[str, Any]) -> tuple[str, Blocks] | None:
    """``(root, module list)`` that ``container`` names from the compiled frame (``L.tail``, ``L.model.layers``,
    ``G.model.layers``; a path without a root starts at the frame's ``self``), or None. ``frame_modules`` is keyed
    by root (``frames.compiled_frame_modules``)."""
    if not rooted_elsewhere(container):
        owner = frame_modules.get(_SELF)
        found = _module_lists(owner).get(container) if isinstance(owner, nn.Module) else None
        return None if found is None else (_SELF, found)
    for name, local in frame_modules.items():
        root = spelled_container(name)
        if container == root:
            return (name, local) if isinstance(local, (nn.ModuleList, nn.Sequential)) else None
        if container.startswith(root + ".") and isinstance(local, nn.Module):
            found = _module_lists(local).get(container[len(root) + 1:])
            return None if found is None else (name, found)
    return None


#: The frame's ``self`` as ``frame_modules`` keys it.
_SELF = "L.self"


def _one_list(homes: dict[int, tuple[str, int] | str], what: str) -> tuple[str, dict[int, int]] | str:
    """The one list every numbered block's home (its list, its position there) names, and the positions; or why
    not: a block without a numbered home, or blocks of several lists."""
    for reason in homes.values():
        if isinstance(reason, str):
            return reason
    owners = {home[0] for home in homes.values() if not isinstance(home, str)}
    if len(owners) > 1:
        return f"its blocks belong to several lists of {what} ({', '.join(sorted(owners))})"
    positions = {number: home[1] for number, home in homes.items() if not isinstance(home, str)}
    return (owners.pop() if owners else ""), positions


def _canonical_positions(blocks: Blocks, numbers: set[int], model: nn.Module) -> tuple[str, dict[int, int]] | str:
    """Each numbered block of ``blocks`` found in ``model`` by identity: its canonical (first) name's list and
    position."""
    canonical = {id(module): name for name, module in model.named_modules()}  # first name of each module

    def home(number: int) -> tuple[str, int] | str:
        if number >= len(blocks):
            return f"it holds no block {number}"
        key = layer_key(canonical.get(id(blocks[number]), ""))
        return key if key is not None else f"its block {number} is no numbered block of {type(model).__name__}"

    return _one_list({number: home(number) for number in sorted(numbers)}, type(model).__name__)


def _numbers(detection: Detection) -> set[int]:
    found = {site.layer for site in detection.sites if site.layer is not None}
    found |= set(detection.layers_present) | {h.layer for h in detection.hidden if h.layer is not None}
    return found | {site.layer for site, _ in detection.unplaced if site.layer is not None}


def _program_attribute_names(program: ExportedProgram, container: str) -> str | None:
    """``_not_positions`` for an export, whose state names are all it keeps of the modules: blocks held as
    attributes (``block_1.wq``) must be numbered 0, 1, 2, ... in the order the state lists them."""
    numbered: dict[str, int] = {}  # attribute path -> its number, in state order
    for key in program.state_dict:
        parts = key.split(".")
        for depth, part in enumerate(parts):
            slot = layer_slot(".".join(parts[:depth + 1]))
            if slot is not None and slot[0] == container and _numbered_attribute(part):
                numbered.setdefault(".".join(parts[:depth + 1]), slot[1])
                break
    return _names_not_positions("the program names its blocks", list(numbered.items()))


def _program_positions(program: ExportedProgram, container: str, numbers: set[int]) -> tuple[str, dict[int, int]] | str:
    """``_canonical_positions`` from an export's names: a tensor's canonical name is its first key in the program's
    ``state_dict`` (an export lists a block reached through two lists under both names, one tensor)."""
    first: dict[int, str] = {}
    for key, value in program.state_dict.items():
        first.setdefault(id(value), key)

    def home(number: int) -> tuple[str, int] | str:
        homes = {layer_slot(first[id(value)]) for key, value in program.state_dict.items()
                 if spelled_container(key).startswith(f"{container}.{number}.")}  # (layer_slot spells as the detector does)
        if len(homes) != 1 or None in homes:
            return f"its block {number} has {'no state' if not homes else 'state of several blocks'}"
        (found,) = homes
        return found if found is not None else f"its block {number} has no numbered state"

    return _one_list({number: home(number) for number in sorted(numbers)}, "the program")


def prove_container_numbers(detection: Detection, context: GraphContext) -> None:
    """Make ``detection``'s module-path numbers the model's layers, or refuse them (see the module docstring)."""
    container = detection.container
    if not container:
        return
    numbers = _numbers(detection)
    model = context.model_object()
    if isinstance(model, ExportedProgram):
        named_by_number = _program_attribute_names(model, container)
        if named_by_number is not None:
            refuse_container(detection, named_by_number)
            return
        _settle(detection, container, _program_positions(model, container, numbers))
        return
    frame_modules = {name: module for name, ref in context.frame_modules if (module := ref()) is not None}
    named = _named_container(container, frame_modules)
    if named is None:
        if rooted_elsewhere(container):
            refuse_container(detection, f"{container}, which names no module list among the compiled frame's "
                                        "locals or the globals it reads")
            return
        owner = frame_modules.get(_SELF)
        named_by_number = _not_positions(owner, container) if isinstance(owner, nn.Module) else None
        if named_by_number is not None:
            refuse_container(detection, named_by_number)
        return  # a plain pass, or blocks named 0, 1, 2, ... in the order they are registered: their positions
    local, blocks = named
    owner = model if isinstance(model, nn.Module) else _owning_module(blocks, numbers, frame_modules)
    if isinstance(owner, str):
        refuse_container(detection, f"{container} (through {local!r}): {owner}")
        return
    _settle(detection, f"{container} (through {local!r})", _canonical_positions(blocks, numbers, owner))


def _not_positions(owner: nn.Module, container: str) -> str | None:
    """Why the numbers ``container`` gives ``owner``'s blocks are names, not positions; None where they are
    positions or name no attribute of ``owner``.

    Blocks held as attributes (``self.block_1``) carry the numbers their author wrote, which may count from 1 or
    skip; a pattern numbers decoder layers by position. Such numbers are positions only where the blocks, in the
    order the module registers them, are numbered 0, 1, 2, ... (A ``ModuleDict``'s keys are read as the layers'
    global numbers, as torchtitan's pipeline stages key them.)
    """
    numbered = [(name, slot[1]) for name, _ in owner.named_modules()
                if _numbered_attribute(name.rsplit(".", 1)[-1]) and (slot := layer_slot(name)) is not None
                and slot[0] == container and spelled_container(name) == f"{container}.{slot[1]}".lstrip(".")]
    return _names_not_positions(f"{type(owner).__name__} names its blocks", numbered)


def _numbered_attribute(name: str) -> bool:
    """``block_1``: a number joined to an attribute's name by an underscore (a module list's or dict's child is
    named by its number alone)."""
    return any(piece.isdigit() for piece in name.split("_")[1:])


def _names_not_positions(who: str, numbered: list[tuple[str, int]]) -> str | None:
    """Why blocks named with numbers (``(name, number)`` in registration order) are not at those positions, or None
    where they are numbered 0, 1, 2, ... (or there are none)."""
    if [number for _, number in numbered] == list(range(len(numbered))):
        return None
    names = [name for name, _ in numbered]
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return (f"{who} {shown}: numbers written in their names, not positions counted from 0 in the order they are "
            "registered, so they need not be the decoder layers' positions (keep the layers in an nn.ModuleList, "
            "or name them 0, 1, 2, ... in order)")


def _owning_module(blocks: Blocks, numbers: set[int], frame_modules: dict[str, Any]) -> nn.Module | str:
    """For a compiled function (no model on the stack): the module the frame reaches that holds every numbered
    block of ``blocks``, where their positions are proven; or why there is none. A module list is no owner: a
    list the function is handed (``run(model.layers[2:4], x)``) numbers its blocks from 0 whichever layers they
    are; the model it was cut from must be in reach (``run(model, blocks, x)``) to number them."""
    wanted = {id(blocks[number]) for number in numbers if number < len(blocks)}
    owners = [module for module in frame_modules.values()
              if isinstance(module, nn.Module) and not isinstance(module, (nn.ModuleList, nn.Sequential))
              and wanted <= {id(sub) for sub in module.modules()}]
    if not owners:
        return ("no model the compiled function reaches holds these blocks, so their positions in the list it "
                "was handed need not be the model's layers; pass the model to the function (or compile the model)")
    return owners[0]


def _settle(detection: Detection, where: str, found: tuple[str, dict[int, int]] | str) -> None:
    if not isinstance(found, str) and len(set(found[1].values())) != len(found[1]):
        found = f"two of its numbered blocks sit at one position of {found[0]} (blocks nested in numbered groups)"
    if isinstance(found, str):
        refuse_container(detection, f"{where}: {found}")
        return
    real, positions = found
    if spelled_container(real) != detection.container or any(number != position for number, position in positions.items()):
        renumber(detection, positions, spelled_container(real), real)
