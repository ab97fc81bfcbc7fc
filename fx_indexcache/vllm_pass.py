"""The module named in vLLM configs: ``"fx_indexcache.vllm_pass.vllm_index_cache_pass"``.

A stable public name for :mod:`fx_indexcache.integrations.vllm` (where the pass lives); importing it
also binds the pass's names in the package namespace, where vLLM's name lookup looks.
"""

from . import _bind_vllm_names
from .integrations.vllm import (  # noqa: F401  (re-exported)
    UncompiledModel,
    VllmIndexCacheConfig,
    VllmIndexCachePass,
    check_vllm_compiles,
    config_from_vllm,
    vllm_index_cache_pass,
)

_bind_vllm_names()

__all__ = [
    "UncompiledModel",
    "VllmIndexCacheConfig",
    "VllmIndexCachePass",
    "check_vllm_compiles",
    "config_from_vllm",
    "vllm_index_cache_pass",
]
