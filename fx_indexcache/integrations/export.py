"""The same rewrite on a ``torch.export`` program."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any

from torch.export import ExportedProgram

from ..config import IndexCacheConfig
from ..context import GraphContext
from ..session import IndexCacheSession
from ..detection.graph_inputs import mark_parameters
from ..report.graph_report import IndexCacheReport
from .graph_pass import IndexCachePass


def apply_index_cache_to_exported_program(
    program: ExportedProgram, config: IndexCacheConfig | Mapping[str, Any] | None = None, *,
    session: IndexCacheSession | None = None, **keys: Any
) -> IndexCacheReport:
    """Rewrite ``program``'s graph in place (S layers reuse F indices) and return the report.

    ``config`` is an ``IndexCacheConfig``, a dict of keys, or keyword keys; without pattern keys the backend's
    default applies (freq 4, on). Works on the ATen graph ``torch.export.export`` produces (``aten.topk`` is kept
    by both the training and inference IRs). Cache writes stay: in an exported program they are buffer-mutation
    outputs that belong to its signature. Applying it again (or compiling ``program.module()`` with the backend)
    reads the layer numbers this rewrite recorded in the graph instead of renumbering the surviving layers.
    ``session``: where the report is kept (the default session when None); the program is its own model there.
    """
    if not isinstance(program, ExportedProgram):
        raise TypeError(f"apply_index_cache_to_exported_program: program={type(program).__name__} is not allowed; "
                        "it must be a torch.export.ExportedProgram")
    config = IndexCacheConfig.coerce(config, keys, "apply_index_cache_to_exported_program", default_on=True)
    if config.drop_shared_indexer_cache_writes:
        raise ValueError(
            "drop_shared_indexer_cache_writes=True is not allowed for an exported program: "
            "its cache writes are part of the program's signature"
        )
    config = dataclasses.replace(config, drop_shared_indexer_cache_writes=False)  # None (where proven) too
    # An exported program is one whole graph, from the model's first layer on: graph order may number it when
    # its indexer count is the model's layer count.
    context = GraphContext(graph_name="exported program", starts_at_first_layer=True, model=weakref.ref(program))
    graph_pass = IndexCachePass(config, session=session, context=context)
    mark_parameters(program.graph_module.graph, program.graph_signature.inputs_to_parameters)  # never keys
    report = graph_pass.run(program.graph_module.graph)
    program.graph_module.recompile()
    return report
