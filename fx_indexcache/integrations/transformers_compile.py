"""Which compiled path of transformers' ``generate()`` a compile belongs to (imports no transformers).

With ``compile_config`` (or a static cache on CUDA), ``generate()`` compiles ``model.__call__`` for the decode
steps only (``PreTrainedModel.get_compiled_call``) and runs the prefill eagerly (``_prefill`` calls
``self(...)``). A backend given through ``CompileConfig`` then applies IndexCache to decode and not to prefill:
a hybrid no oracle describes (the prefill writes every layer's own indexer keys and attends with every layer's
own top-k). ``decode_only_note`` recognises that compile, so the backend can say so.
"""

from __future__ import annotations

import sys
from typing import Any

#: Where transformers' generation loop lives; its frames are the callers of a decode-step compile.
_GENERATION_MODULE = "transformers.generation"


def _compiled_forward(model: Any) -> bool:
    """Whether ``model.forward`` is itself a ``torch.compile`` wrapper (the static-cache recipe)."""
    forward = model.__dict__.get("forward")
    return forward is not None and hasattr(forward, "_torchdynamo_orig_callable")


def generating_model(backend: Any) -> Any | None:
    """The model whose transformers decode-step compile is running ``backend`` now, or None.

    Found on the Python stack: a frame of ``transformers.generation`` whose ``self`` is a model that transformers
    compiled with this backend (``model._last_compile_config.backend == backend``). A chunked prefill runs the same
    compiled call from ``_prefill``; that compile is not decode-only and is not matched.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_GENERATION_MODULE) and frame.f_code.co_name != "_prefill":
            model = frame.f_locals.get("self")
            compile_config = getattr(model, "_last_compile_config", None)
            if compile_config is not None and getattr(compile_config, "backend", None) == backend:
                return model
        frame = frame.f_back
    return None


def decode_only_note(backend: Any) -> str | None:
    """A note for a compile that is transformers' decode step with an eager prefill, or None."""
    if "transformers" not in sys.modules:
        return None
    model = generating_model(backend)
    if model is None or _compiled_forward(model):
        return None
    return (
        f"transformers' generate() compiled only the decode step of {type(model).__name__} with {backend!r} "
        "(compile_config): its prefill runs eagerly, WITHOUT IndexCache, so prefill and decode disagree on the "
        "pattern. For IndexCache in both, compile the forward instead: model.forward = torch.compile(model.forward, "
        "backend=IndexCacheBackend(...), mode='reduce-overhead'), then generate(..., cache_implementation='static')"
    )
