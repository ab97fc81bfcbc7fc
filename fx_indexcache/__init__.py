"""fx_indexcache: IndexCache for any DeepSeek-Sparse-Attention model, as a torch.compile pass.

Layers marked F compute their lightning-indexer top-k; layers marked S reuse the indices of
the nearest preceding F layer, and the pass deletes their indexers from the compiled graph.
"""

from .backend import indexcache_backend, indexcache_eager_backend
from .config import IndexCacheConfig
from .detection import detect, register_site_finder
from .export import apply_index_cache_to_exported_program
from .graph_pass import IndexCachePass
from .report import IndexCacheReport, clear_reports, reports

__all__ = [
    "IndexCacheConfig",
    "IndexCachePass",
    "IndexCacheReport",
    "apply_index_cache_to_exported_program",
    "clear_reports",
    "detect",
    "indexcache_backend",
    "indexcache_eager_backend",
    "register_site_finder",
    "reports",
]
