"""``IndexCachePass``: the post-grad Inductor pass that composes detection, rewrite and report."""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

from torch import fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..config import IndexCacheConfig
from ..detection.registry import detect, finders_fingerprint
from ..fuse.precision import PrecisionRecord, precision_records
from ..fuse.substitute import FusionRecord, substitute_fused_indexer
from ..graph_utils import fake_value
from ..report.graph_report import IndexCacheReport, publish
from ..report.trace import PassTrace
from ..rewrite.cache_ledger import CacheWriteLedger
from ..rewrite.cross_graph_build import pending_plan
from ..rewrite.regional import share_across_regions
from ..rewrite.share import apply_index_cache

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parents[1]  # the fx_indexcache package directory


@functools.lru_cache(maxsize=None)
def _package_digest(root: Path) -> str:
    """Hash of every ``.py`` file under ``root``: all the code that can shape the rewritten graph.

    The whole package rather than a list of modules, so a module added later (or one a list would
    forget, such as the vLLM pass's MTP rule or the kernel's support check) cannot be missed.
    """
    files = sorted(path for path in root.rglob("*.py") if "__pycache__" not in path.parts)
    if not files:
        raise FileNotFoundError(f"fx_indexcache: no source files under {root} to hash for the pass's uuid")
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _source_digest() -> str:
    """The package's source and every registered site finder's code."""
    return hashlib.sha256(f"{_package_digest(_PACKAGE)}|{finders_fingerprint()}".encode()).hexdigest()


class IndexCachePass(CustomGraphPass):
    """Rewrites a post-grad ATen graph in place so S layers reuse their F layer's indices.

    Use it as Inductor's ``post_grad_custom_post_pass`` (``indexcache_backend`` does that),
    or call it on any ``fx.Graph``. ``uuid()`` covers the config, this package's source and the
    registered site finders, so the FX graph cache never serves a graph rewritten under another
    pattern. Keyword keys switch ``use_index_cache`` on unless it is given, as everywhere else.

    ``graph_starts_at_first_layer``: whether the graph begins at the model's first DSA layer
    (True for a whole exported program; the backends tell it for each dynamo graph; None: not
    known). Only then may sites without a layer number in their module path be numbered by graph
    order; otherwise their layer index is unknown and every layer of the graph computes.
    ``ledger``: where the model's cache-write choices are kept across its graphs (see
    ``cache_ledger``); the process-wide default when None.
    """

    def __init__(
        self,
        config: IndexCacheConfig | None = None,
        *,
        graph_starts_at_first_layer: bool | None = None,
        ledger: CacheWriteLedger | None = None,
        **keys,
    ) -> None:
        if config is None:
            config = IndexCacheConfig.from_keys(**keys)
        elif keys:
            raise TypeError("IndexCachePass takes a config or keyword keys, not both")
        if graph_starts_at_first_layer not in (None, True, False):
            raise ValueError(
                f"IndexCachePass: graph_starts_at_first_layer={graph_starts_at_first_layer!r} is not allowed; "
                "it must be True, False or None"
            )
        self.config = config
        self.graph_starts_at_first_layer = graph_starts_at_first_layer
        self.ledger = ledger
        self.reports: list[IndexCacheReport] = []

    def __call__(self, graph: fx.Graph) -> None:
        self.run(graph)

    def run(self, graph: fx.Graph, graph_name: str = "") -> IndexCacheReport:
        """Detect, rewrite (every layer F when ``use_index_cache`` is off), fuse F-layer scoring where enabled and on
        CUDA; returns and publishes the report."""
        trace = PassTrace(graph, graph_name)
        trace.dump("before")
        with trace.stage("detect"):
            detection = detect(graph, self.graph_starts_at_first_layer)
        with trace.stage("share"):
            decisions = apply_index_cache(graph, detection, self.config, self.ledger)  # all F when off
        with trace.stage("regions"):
            regional = share_across_regions(graph.owning_module, self.config) if (
                detection.nested_regions and isinstance(graph.owning_module, fx.GraphModule)) else []
        handled = {call.region for call in regional}  # their calls are reported one by one instead
        detection.nested_regions = [n for n in detection.nested_regions if n.split(" ")[0] not in handled]
        with trace.stage("fuse"):
            kernel_records, precision = fuse_indexers(graph, detection.sites, self.config)
        trace.dump("after")
        report = IndexCacheReport.build(self.config, detection, decisions, graph_name)
        report.cross_graph = pending_plan()  # a graph that runs as several layers: decided per call
        report.regional = regional
        plan = report.cross_graph
        cross_graph_active = plan is not None and plan.active and not plan.numbered
        if cross_graph_active:
            for decision in decisions:
                decision.note = "layer index unknown at compile time: found per call (see the cross-graph line)"
        elif plan is not None and plan.active:
            for decision in decisions:
                if decision.layer in plan.reads:
                    decision.note += (f"; reads layer {plan.source}'s indices from an earlier graph when the "
                                      "run-time check passes")
        if detection.unknown_reason is not None and self.config.use_index_cache and not cross_graph_active:
            log.warning(
                "fx_indexcache: %s: the layer index of its %d indexer(s) is unknown (%s); every layer in it computes, "
                "the configured pattern is not applied there",
                graph_name or "compiled graph", len(decisions), detection.unknown_reason.value,
            )
        report.fusions = kernel_records
        report.precision = precision
        stats = counters["fx_indexcache"]
        stats["indexers_fused"] += report.indexers_fused
        stats["graphs"] += 1
        stats["indexer_sites"] += len(decisions)
        stats["indexers_removed"] += report.indexers_removed
        stats["layers_left"] += len(report.layers_left)
        stats["other_topk"] += report.router_topk
        self.reports.append(report)
        trace.finish()
        publish(report)
        return report

    def uuid(self) -> str:
        state = f"{self.config.fingerprint()}|starts={self.graph_starts_at_first_layer}|{_source_digest()}"
        return hashlib.sha256(state.encode()).hexdigest()


def fuse_indexers(graph: fx.Graph, sites, config: IndexCacheConfig) -> tuple[list[FusionRecord], list[PrecisionRecord]]:
    """Swap the F layers' scoring for the fused kernel, only where some site lives on CUDA; with
    ``indexer_precision`` other than bf16, also say per F layer whether that precision runs.

    With IndexCache off the graph stays exactly as it is unless the kernel was asked for
    explicitly (``fuse_indexer_kernel=True``).
    """
    def is_cuda(site) -> bool:
        return getattr(fake_value(site.indices), "is_cuda", False)

    live = [s for s in sites if not getattr(s.anchor, "_erased", False) and s.anchor.graph is graph]
    on_cuda = [s for s in live if is_cuda(s)]
    precision = config.indexer_precision
    records = substitute_fused_indexer(graph, on_cuda, precision) if config.fuses_kernel and on_cuda else []
    rows = precision_records(precision, live, records, fusion_enabled=config.fuses_kernel, on_cuda=is_cuda)
    missed = [r for r in rows if r.reason is not None]
    if missed:
        log.warning(
            "fx_indexcache: %s: indexer_precision=%r not applied at %d of %d F-layer indexers (%s); they score "
            "exactly in bf16/fp32", graph.owning_module.__class__.__name__ if graph.owning_module else "graph",
            precision, len(missed), len(rows), "; ".join(sorted({r.reason.value for r in missed})),
        )
    return records, rows


class FusionOnlyPass(CustomGraphPass):
    """The pass's kernel fusion alone, for graphs the IndexCache rewrite has already shared: the cross-graph
    variants (``rewrite.cross_graph_build``), which the wrapper runs instead of the as-is graph when its
    run-time check passes. Without it their F layers would run Inductor's unfused scoring while the as-is
    graph's report says they are fused (session 9 measured that on an H200: 0.99x instead of 8.9x)."""

    def __init__(self, config: IndexCacheConfig) -> None:
        self.config = config

    def __call__(self, graph: fx.Graph) -> None:
        records, _ = fuse_indexers(graph, detect(graph).sites, self.config)
        counters["fx_indexcache"]["variant_indexers_fused"] += sum(r.fused for r in records)

    def uuid(self) -> str:
        return hashlib.sha256(f"fusion only|{self.config.fingerprint()}|{_source_digest()}".encode()).hexdigest()
