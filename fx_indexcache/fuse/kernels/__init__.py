"""GPU kernels for DSA indexers (Triton, imported lazily: this package imports without a GPU).

The fused indexer (logits + top-k in one call) is ``lightning_indexer.lightning_indexer``; the graph
substitution inserts the ``torch.ops.fx_indexcache.indexer_logits`` (or ``indexer_logits_fp8``, from
``indexer_fp8``) and ``topk_indices`` ops defined there, or, where only the indices are read,
``indexer_topk_fused`` (``indexer_topk_fused``: score and top-k in one pass, no logits written).
"""

from .indexer_fp8 import indexer_logits_fp8, indexer_logits_fp8_reference
from .fused_score_topk import indexer_topk_fused, indexer_topk_fused_reference
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
from .topk import row_topk

__all__ = [
    "LogitsConfig",
    "default_config",
    "indexer_logits",
    "indexer_logits_fp8",
    "indexer_logits_fp8_reference",
    "indexer_logits_reference",
    "indexer_topk",
    "indexer_topk_fused",
    "indexer_topk_fused_reference",
    "is_supported",
    "lightning_indexer_reference",
    "row_topk",
    "unsupported_reason",
]
