"""Whether the graph a ``torch.compile`` backend is handed begins where the compiled callable begins.

A graph without module paths can only be numbered by its own order, and that order is the
model's layer index only for a graph that starts at the model's first DSA layer. Dynamo hands a
backend one graph per frame it compiles: the compiled callable's own frame (its first graph
starts at the top of the model), a resume function after a graph break (code named
``torch_dynamo_resume_in_...``, starting mid-model), or a function or module dynamo compiles on
its own because the frame above it could not be traced (one graph that may serve several
layers). Only the first kind may be numbered by order; this module tells them apart from the
Python stack at the time the backend runs, and answers None outside a dynamo compile.

The generated ``forward`` of an ``fx.GraphModule`` (``ExportedProgram.module()``, a traced
graph) is never taken for the model's own code: it may be a graph this pass already rewrote,
whose survivors graph order would renumber. Such a graph carries its layer numbers in the
records the rewrite left (``layer_records``), or its module paths.
"""

from __future__ import annotations

import sys
from pathlib import PurePath
from types import FrameType

RESUME_PREFIX = "torch_dynamo_resume_in_"
FX_GENERATED_PREFIX = "<eval_with_key>"

_CONVERT_FRAME = ("torch", "_dynamo", "convert_frame.py")
_EVAL_FRAME = ("torch", "_dynamo", "eval_frame.py")
_MODULE_CALL = ("torch", "nn", "modules", "module.py")


def _is_file(frame: FrameType, parts: tuple[str, ...]) -> bool:
    return PurePath(frame.f_code.co_filename).parts[-len(parts):] == parts


def _outermost_convert_frame() -> FrameType | None:
    """Dynamo's outermost ``convert_frame`` frame on the stack: the eval-frame callback's entry."""
    found = None
    frame = sys._getframe(1)
    while frame is not None:
        if _is_file(frame, _CONVERT_FRAME):
            found = frame
        frame = frame.f_back
    return found


def _compiled_code(callback: FrameType):
    """The code object dynamo is compiling, from the callback's ``frame`` argument."""
    frame = callback.f_locals.get("frame")
    code = getattr(frame, "f_code", None)
    if code is None:
        from torch._guards import TracingContext

        traced = TracingContext.get_traced_code() or []
        code = traced[0] if traced else None
    return code


def _compiled_frame() -> FrameType | None:
    """The frame dynamo is compiling now, or None outside a compile."""
    callback = _outermost_convert_frame()
    return None if callback is None else callback.f_locals.get("frame")


def _compiled_frame_names() -> dict[str, dict]:
    """What the frame dynamo is compiling now reaches by name, by the root dynamo writes into a path that starts
    there: ``"L"``, its locals (arguments, closure cells); ``"G"``, the module globals its code reads (a compiled
    ``step`` that calls a global ``model``). Empty outside a compile or where a frame's names cannot be read."""
    frame = _compiled_frame()
    try:
        local_names = dict(getattr(frame, "f_locals", None) or {})
        code, global_names = getattr(frame, "f_code", None), getattr(frame, "f_globals", None) or {}
        read = set(getattr(code, "co_names", ()))
        return {"L": local_names, "G": {name: value for name, value in global_names.items() if name in read}}
    except Exception:  # a frame object whose names cannot be read: nothing is known
        return {"L": {}, "G": {}}


def compiled_frame_values() -> list:
    """The values of the frame dynamo is compiling now, or [] outside a dynamo compile: where a compiled function
    (``torch.compile(step)`` with ``step`` calling ``model``) holds the model it runs, which is on no Python stack
    at compile time: an argument, a closure cell or a global its code reads."""
    return [value for names in _compiled_frame_names().values() for value in names.values()]


def compiled_frame_modules() -> dict[str, object]:
    """The modules the frame dynamo is compiling now reaches by name, keyed by the root dynamo writes into a module
    path that starts at them (``L.tail`` for the local ``tail``, ``G.model`` for a global its code reads; {} outside
    a compile): what a path rooted there (``L['tail'][0]``, ``G['model'].layers[3]``) names."""
    import torch.nn as nn

    return {f"{root}.{name}": value for root, names in _compiled_frame_names().items()
            for name, value in names.items() if isinstance(value, nn.Module)}


def dynamo_graph_starts_at_first_layer() -> bool | None:
    """True when the graph dynamo is compiling is the compiled callable's own frame; None outside dynamo.

    Call it from inside a ``torch.compile`` backend. The callable's own frame is the one whose
    caller is ``torch.compile``'s wrapper (through ``nn.Module.__call__`` plumbing only); a
    resume function or a frame called from user code is not. The answer is about where the graph
    begins: a callable that is itself only part of a model (one layer compiled alone) is taken
    for the model, which docs/limits.md states.
    """
    callback = _outermost_convert_frame()
    if callback is None:
        return None
    code = _compiled_code(callback)
    if code is None:
        return None
    if code.co_name.startswith(RESUME_PREFIX) or code.co_filename.startswith(FX_GENERATED_PREFIX):
        return False
    caller = callback.f_back
    while caller is not None and _is_file(caller, _MODULE_CALL):
        caller = caller.f_back
    return caller is not None and _is_file(caller, _EVAL_FRAME)
