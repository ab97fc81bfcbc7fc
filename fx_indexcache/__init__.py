"""fx_indexcache: IndexCache for any DeepSeek-Sparse-Attention model, as a torch.compile pass.

Layers marked F compute their lightning-indexer top-k; layers marked S reuse the indices of
the nearest preceding F layer, and the pass deletes their indexers from the compiled graph.
"""

from .backend import IndexCacheBackend, IndexCacheEagerBackend, indexcache_backend, indexcache_eager_backend
from .config import IndexCacheConfig
from .cross_graph import layer_calls
from .detection import detect, register_site_finder
from .export import apply_index_cache_to_exported_program
from .graph_pass import IndexCachePass
from .report import IndexCacheReport, clear_reports, reports
from .sharing_report import format_layer_sharing, layer_sharing

__all__ = [
    "IndexCacheBackend",
    "IndexCacheEagerBackend",
    "IndexCacheConfig",
    "IndexCachePass",
    "IndexCacheReport",
    "apply_index_cache_to_exported_program",
    "clear_reports",
    "detect",
    "format_layer_sharing",
    "indexcache_backend",
    "indexcache_eager_backend",
    "layer_calls",
    "layer_sharing",
    "register_site_finder",
    "reports",
]

import sys as _sys

from . import detect_vllm  # noqa: E402,F401  (finder for vLLM's indexer op; imports no vLLM)


def __getattr__(name):
    # The vLLM pass loads on first use, so importing fx_indexcache never imports vLLM.
    if name in ("VllmIndexCachePass", "vllm_index_cache_pass"):
        from . import vllm_pass

        return getattr(vllm_pass, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# vLLM resolves a pass name as __import__("fx_indexcache").__dict__[name], which never calls
# __getattr__: when vLLM is already loaded (it is the one asking), bind the names for real.
if "vllm.config" in _sys.modules:
    from .vllm_pass import VllmIndexCachePass, vllm_index_cache_pass  # noqa: E402,F401
