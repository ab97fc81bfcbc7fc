"""Shared helpers: small reference models, an oracle runner, and a backend that keeps the rewritten graph."""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from fx_indexcache import IndexCacheConfig, IndexCachePass, clear_reports
from fx_indexcache.reference import DSAModelConfig, ReferenceDSAModel

# Tiny models: one intra-op thread is faster than two, and steady on a shared 2-core machine.
torch.set_num_threads(1)


def model_pair(config: DSAModelConfig, dtype=torch.float32, seed: int = 0):
    """Two models with identical weights: one to compile, one to run the hand-written IndexCache."""
    return ReferenceDSAModel(config, seed=seed, dtype=dtype), ReferenceDSAModel(config, seed=seed, dtype=dtype)


class CapturingBackend:
    """AOT + IndexCachePass, run eagerly, keeping every rewritten forward graph for inspection."""

    def __init__(self, **options) -> None:
        self.config, rest = IndexCacheConfig.from_options(options)
        assert not rest, rest
        self.graph_pass = IndexCachePass(self.config)
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        def forward_compiler(module, inputs):
            self.graph_pass(module.graph)
            module.recompile()
            self.graphs.append(module)
            return make_boxed_func(module.forward)

        return aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)

    @property
    def reports(self):
        return self.graph_pass.reports


def topk_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target == torch.ops.aten.topk.default]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no recompile limits or reports carried between tests."""
    torch._dynamo.reset()
    clear_reports()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
