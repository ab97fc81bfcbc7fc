"""One capturing backend for the tests: AOTAutograd's forward ATen graph, a rewrite, run eagerly.

It keeps every graph twice, before and after the rewrite, so a test can assert what the rewrite
changed (``count_before`` / ``count_after``: how many nodes call a target) as well as what it left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fx_indexcache.graph_utils import copy_graph_module
from fx_indexcache.integrations.backend import aten_graph_backend


def count_calls(module: torch.fx.GraphModule, target: Any) -> int:
    """How many nodes of ``module``'s graph call ``target``."""
    return sum(node.target == target for node in module.graph.nodes)


class GraphCapture:
    """A ``torch.compile`` backend: AOT forward graph -> ``rewrite(graph)`` -> the graph run eagerly.

    ``before[i]`` / ``graphs[i]`` are the i-th compiled graph before and after ``rewrite``; ``results[i]``
    is what ``rewrite`` returned for it (a report, a list of records). ``runner(module)`` gives the
    callable run in place of the rewritten module (its ``forward`` unless given).
    """

    def __init__(self, rewrite: Callable[[torch.fx.Graph], Any],
                 runner: Callable[[torch.fx.GraphModule], Callable] | None = None, **aot_options: Any) -> None:
        self.rewrite = rewrite
        self.runner = runner or (lambda module: module.forward)
        self.aot_options = aot_options
        self.before: list[torch.fx.GraphModule] = []
        self.graphs: list[torch.fx.GraphModule] = []
        self.results: list[Any] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        def compile_graph(module: torch.fx.GraphModule) -> Callable:
            self.before.append(copy_graph_module(module))
            self.results.append(self.rewrite(module.graph))
            module.recompile()
            self.graphs.append(module)
            return self.runner(module)

        return aten_graph_backend(compile_graph, **self.aot_options)(gm, example_inputs)

    def count_before(self, target: Any) -> list[int]:
        return [count_calls(module, target) for module in self.before]

    def count_after(self, target: Any) -> list[int]:
        return [count_calls(module, target) for module in self.graphs]
