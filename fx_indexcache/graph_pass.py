"""``IndexCachePass``: the post-grad Inductor pass that composes detection, rewrite and report."""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

from .config import IndexCacheConfig
from .detection import detect
from .graph_utils import fake_value
from .kernel_substitution import FusionRecord, substitute_fused_indexer
from .report import IndexCacheReport, publish
from .rewrite import apply_index_cache

_PACKAGE = Path(__file__).resolve().parent
#: The modules whose code decides what the rewritten graph is: an edit to any of them → new uuid.
REWRITE_MODULES = (
    "config.py",
    "detect_topk.py",
    "detect_vllm.py",
    "detection.py",
    "graph_pass.py",
    "graph_utils.py",
    "kernel_substitution.py",
    "layers.py",
    "rewrite.py",
    "sites.py",
)


def _source_digest() -> str:
    """Hash of the code that shapes the rewritten graph (not the CLI, models or benchmarks)."""
    digest = hashlib.sha256()
    for path in (_PACKAGE / name for name in REWRITE_MODULES):
        if not path.exists():
            continue
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class IndexCachePass(CustomGraphPass):
    """Rewrites a post-grad ATen graph in place so S layers reuse their F layer's indices.

    Use it as Inductor's ``post_grad_custom_post_pass`` (``indexcache_backend`` does that),
    or call it on any ``fx.Graph``. ``uuid()`` covers the config and this package's source,
    so the FX graph cache never serves a graph rewritten under another pattern.
    """

    def __init__(self, config: IndexCacheConfig | None = None, **keys) -> None:
        if config is None:
            config = IndexCacheConfig(**keys)
        elif keys:
            raise TypeError("IndexCachePass takes a config or keyword keys, not both")
        self.config = config
        self.reports: list[IndexCacheReport] = []

    def __call__(self, graph: fx.Graph) -> None:
        self.run(graph)

    def run(self, graph: fx.Graph, graph_name: str = "") -> IndexCacheReport:
        """Detect, rewrite (every layer F when ``use_index_cache`` is off), fuse F-layer scoring where enabled and on
        CUDA; returns and publishes the report."""
        detection = detect(graph)
        decisions = apply_index_cache(graph, detection, self.config)  # all F when use_index_cache is off
        kernel_records = self._fuse_indexers(graph, detection.sites)
        report = IndexCacheReport.build(self.config, detection, decisions, graph_name)
        report.other_notes.extend(r.note() for r in kernel_records)
        stats = counters["fx_indexcache"]
        stats["indexers_fused"] += sum(r.fused for r in kernel_records)
        stats["graphs"] += 1
        stats["indexer_sites"] += len(decisions)
        stats["indexers_removed"] += report.indexers_removed
        stats["layers_left"] += len(report.layers_left)
        stats["other_topk"] += report.router_topk
        self.reports.append(report)
        publish(report)
        return report

    def _fuse_indexers(self, graph: fx.Graph, sites) -> list[FusionRecord]:
        """Swap the F layers' scoring for the fused kernel, only where some site lives on CUDA."""
        if not self.config.fuse_indexer_kernel:
            return []
        on_cuda = [s for s in sites if getattr(fake_value(s.indices), "is_cuda", False)]
        if not on_cuda:
            return []
        return substitute_fused_indexer(graph, on_cuda)

    def uuid(self) -> str:
        return hashlib.sha256(f"{self.config.fingerprint()}|{_source_digest()}".encode()).hexdigest()
