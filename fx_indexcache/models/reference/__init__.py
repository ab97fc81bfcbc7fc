"""Built-in DeepSeek-V3.2-shaped reference model (MLA + DSA indexer + MoE) with a hand-written IndexCache."""

from .cache import DSACache
from .model import (
    DenseMLP,
    DSADecoderLayer,
    DSAModelConfig,
    LightningIndexer,
    MLAttention,
    MoE,
    MoEExperts,
    MoEGate,
    ReferenceDSAModel,
    RMSNorm,
    validate_index_cache_pattern,
)

__all__ = [
    "DSACache",
    "DSADecoderLayer",
    "DSAModelConfig",
    "DenseMLP",
    "LightningIndexer",
    "MLAttention",
    "MoE",
    "MoEExperts",
    "MoEGate",
    "RMSNorm",
    "ReferenceDSAModel",
    "validate_index_cache_pattern",
]
