"""GPU kernels for DSA indexers (Triton, imported lazily: this package imports without a GPU).

The fused indexer is ``fx_indexcache.kernels.lightning_indexer.lightning_indexer``; it is re-exported
here as ``fused_lightning_indexer`` so that the name ``lightning_indexer`` keeps meaning the submodule.
"""

from .indexer_fp8 import indexer_logits_fp8, indexer_logits_fp8_reference
from .lightning_indexer import (
    LogitsConfig,
    default_config,
    indexer_logits,
    indexer_logits_reference,
    indexer_topk,
    is_supported,
    lightning_indexer_reference,
    unsupported_reason,
)
from .lightning_indexer import lightning_indexer as fused_lightning_indexer
from .topk import row_topk

__all__ = [
    "LogitsConfig",
    "default_config",
    "fused_lightning_indexer",
    "indexer_logits",
    "indexer_logits_fp8",
    "indexer_logits_fp8_reference",
    "indexer_logits_reference",
    "indexer_topk",
    "is_supported",
    "lightning_indexer_reference",
    "row_topk",
    "unsupported_reason",
]
