"""The module named in vLLM configs: ``"fx_indexcache.vllm_pass.vllm_index_cache_pass"``.

A stable public name for :mod:`fx_indexcache.integrations.vllm` (where the pass lives); importing it
also binds the pass's names in the package namespace, where vLLM's name lookup looks.
"""

from . import _bind_vllm_names
from .integrations import vllm as _vllm
from .integrations.vllm import *  # noqa: F401,F403  (re-exported: the names of its __all__)

__all__ = list(_vllm.__all__)

_bind_vllm_names()
