"""Shared helpers: small reference models, an oracle runner, and a backend that keeps the rewritten graph."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# A session-private Inductor cache: a warm cache from an earlier run of the same code would serve
# graphs without rewriting them, and the tests read this run's per-layer reports. Set before torch
# compiles anything; subprocesses inherit it.
_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="fx_indexcache_tests_inductor_")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE
atexit.register(shutil.rmtree, _INDUCTOR_CACHE, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from capture import GraphCapture  # noqa: E402
from failure_log import pytest_runtest_logreport  # noqa: E402,F401  (a hook: failures written as they happen)
from fx_indexcache import IndexCacheConfig, IndexCachePass, clear_reports  # noqa: E402
from fx_indexcache.fuse import substitute as kernel_substitution  # noqa: E402
from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel  # noqa: E402
from fx_indexcache.context import GraphContext  # noqa: E402
from fx_indexcache.session import default_session  # noqa: E402

#: The context a backend gives a pass whose graph holds no module paths: its layer numbers are known to rest on
#: nothing outside the graph's code, so its ``uuid()`` is a key (a pass installed by hand has none).
KEYED = GraphContext(numbering_digest="")

# Tiny models: one intra-op thread is faster than two, and steady on a shared 2-core machine.
torch.set_num_threads(1)


def model_pair(config: DSAModelConfig, dtype=torch.float32, seed: int = 0):
    """Two models with identical weights: one to compile, one to run the hand-written IndexCache."""
    return ReferenceDSAModel(config, seed=seed, dtype=dtype), ReferenceDSAModel(config, seed=seed, dtype=dtype)


class CapturingBackend(GraphCapture):
    """AOT + IndexCachePass, run eagerly, keeping every forward graph before and after the rewrite."""

    def __init__(self, **options) -> None:
        self.config, rest = IndexCacheConfig.from_options(options)
        assert not rest, rest
        self.graph_pass = IndexCachePass(self.config)
        super().__init__(self.graph_pass.run)

    def __call__(self, gm, example_inputs):
        from fx_indexcache.detection.frames import dynamo_graph_starts_at_first_layer

        self.graph_pass = self.graph_pass.with_context(starts_at_first_layer=dynamo_graph_starts_at_first_layer())
        self.rewrite = self.graph_pass.run
        return super().__call__(gm, example_inputs)

    @property
    def reports(self):
        return self.graph_pass.reports


def topk_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target == torch.ops.aten.topk.default]


def trace_one_topk(fn, *args) -> tuple[torch.fx.GraphModule, torch.fx.Node]:
    """``fn`` traced to an ATen graph (``make_fx``, fake tensors) and its one ``aten.topk`` node."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn, tracing_mode="fake")(*args)
    (topk,) = topk_nodes(gm)
    return gm, topk


@pytest.fixture
def sites_on_cuda(monkeypatch):
    """IndexCachePass takes every site for a CUDA one, so it asks for the fused kernel off CUDA too."""
    from fx_indexcache.integrations import graph_pass

    monkeypatch.setattr(graph_pass, "fake_value", lambda node: type("Cuda", (), {"is_cuda": True})())


@pytest.fixture
def kernel_ok(monkeypatch):
    """Accept every proven site as if the kernel supported it (off CUDA the op runs its reference)."""
    monkeypatch.setattr(kernel_substitution, "kernel_refusal", lambda q, k, w, scale: None)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no recompile limits or reports carried between tests."""
    torch._dynamo.reset()
    clear_reports()
    default_session().clear()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
