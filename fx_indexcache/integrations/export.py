"""The same rewrite on a ``torch.export`` program."""

from __future__ import annotations

from typing import Any

from torch.export import ExportedProgram

from ..config import IndexCacheConfig
from ..detection.graph_inputs import declared_parameters
from ..report.graph_report import IndexCacheReport
from .graph_pass import IndexCachePass


def apply_index_cache_to_exported_program(
    program: ExportedProgram, config: IndexCacheConfig | None = None, **keys: Any
) -> IndexCacheReport:
    """Rewrite ``program``'s graph in place (S layers reuse F indices) and return the report.

    Works on the ATen graph ``torch.export.export`` produces (``aten.topk`` is kept by both
    the training and inference IRs). Cache writes stay: in an exported program they are
    buffer-mutation outputs that belong to its signature. Applying it again (or compiling
    ``program.module()`` with the backend) reads the layer numbers this rewrite recorded in the
    graph instead of renumbering the surviving layers.
    """
    if config is None:
        config, rest = IndexCacheConfig.from_options(keys)
        if rest:
            raise ValueError(f"apply_index_cache_to_exported_program: unknown keys {sorted(rest)}")
    if config.drop_shared_indexer_cache_writes:
        raise ValueError(
            "drop_shared_indexer_cache_writes=True is not allowed for an exported program: "
            "its cache writes are part of the program's signature"
        )
    # An exported program is one whole graph, from the model's first layer on: graph order may number it.
    graph_pass = IndexCachePass(config, graph_starts_at_first_layer=True)
    with declared_parameters(program.graph_signature.inputs_to_parameters):  # weights are never keys
        report = graph_pass.run(program.graph_module.graph, graph_name="exported program")
    program.graph_module.recompile()
    return report
