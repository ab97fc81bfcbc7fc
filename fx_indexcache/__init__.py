"""fx_indexcache: IndexCache for any DeepSeek-Sparse-Attention model, as a torch.compile pass.

Layers marked F compute their lightning-indexer top-k; layers marked S reuse the indices of
the nearest preceding F layer, and the pass deletes their indexers from the compiled graph.
"""

import torch as _torch

from ._torch_version import UntestedTorchWarning, warn_if_untested_torch as _warn_if_untested_torch
from ._version import __version__

# First, before the modules that reach into torch internals: an untested torch is the first thing to suspect
# when one of them fails to import. (ruff's E402 is off for this file in pyproject.toml for this reason.)
_warn_if_untested_torch(_torch.__version__)

from .config import IndexCacheConfig
from .detection.registry import detect, register_site_finder
from .integrations.backend import IndexCacheBackend, IndexCacheEagerBackend, indexcache_backend, indexcache_eager_backend
from .integrations.export import apply_index_cache_to_exported_program
from .integrations.graph_pass import IndexCachePass
from .integrations.transformers_cache import prepared_static_cache
from .report.graph_report import IndexCacheReport
from .report.sharing import format_layer_sharing, layer_sharing
from .session import IndexCacheSession, clear_reports, default_session, layer_calls, reports
from .tools.overlap import OverlapResult
from .tools.pattern_choice import PatternChoice, measure_overlap, search_pattern

__all__ = [
    "IndexCacheBackend",
    "IndexCacheEagerBackend",
    "IndexCacheConfig",
    "IndexCachePass",
    "IndexCacheReport",
    "IndexCacheSession",
    "OverlapResult",
    "PatternChoice",
    "UntestedTorchWarning",
    "__version__",
    "apply_index_cache_to_exported_program",
    "clear_reports",
    "default_session",
    "detect",
    "format_layer_sharing",
    "indexcache_backend",
    "indexcache_eager_backend",
    "layer_calls",
    "layer_sharing",
    "measure_overlap",
    "prepared_static_cache",
    "register_site_finder",
    "reports",
    "search_pattern",
]

import sys as _sys

from .detection import vllm_op as _vllm_op  # noqa: E402,F401  (registers the finder for vLLM's indexer op; imports no vLLM)

#: Names of the vLLM pass (``integrations/vllm.py``), bound here only once vLLM is wanted, so that
#: importing fx_indexcache never imports vLLM.
_VLLM_NAMES = ("VllmIndexCachePass", "vllm_index_cache_pass")


def _bind_vllm_names() -> None:
    """Import the vLLM pass and bind its public names in this namespace.

    The one mechanism behind every way the names are reached: vLLM resolves a configured pass name as
    ``__import__(module).__dict__[name]``, a lookup in this package's namespace that a module
    ``__getattr__`` never sees, so the names must really be here once anyone asks for them.
    """
    from .integrations import vllm

    globals().update({name: getattr(vllm, name) for name in _VLLM_NAMES})


def __getattr__(name):
    if name in _VLLM_NAMES:  # ``fx_indexcache.VllmIndexCachePass`` from Python
        _bind_vllm_names()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "vllm.config" in _sys.modules:  # vLLM came first: "fx_indexcache.vllm_index_cache_pass" resolves too
    _bind_vllm_names()
