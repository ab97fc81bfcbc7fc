"""``indexcache_backend``: Inductor with the IndexCache pass as its post-grad custom pass.

``torch.compile(model, backend=indexcache_backend, options={...})``: IndexCache keys in
``options`` configure the pass (freq 4 when none is given), every other key is an Inductor
option passed through unchanged. Also registered as ``backend="indexcache"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .config import IndexCacheConfig
from .frames import dynamo_graph_starts_at_first_layer
from .graph_pass import IndexCachePass
from .report import IndexCacheReport, publish


class _Chain(CustomGraphPass):
    """Our pass followed by a post-grad pass the user already set, with a joint uuid."""

    def __init__(self, *passes) -> None:
        self.passes = passes

    def __call__(self, graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self):
        uuids = [getattr(p, "uuid", lambda: None)() for p in self.passes]
        return None if None in uuids else repr(uuids)


def indexcache_inductor_patches(
    options: Mapping[str, Any] | None, graph_starts_at_first_layer: bool | None = None
) -> tuple[IndexCachePass, dict[str, Any]]:
    """The pass configured from ``options`` and the Inductor config patches that install it."""
    config, inductor_options = IndexCacheConfig.from_options(options)
    graph_pass = IndexCachePass(config, graph_starts_at_first_layer=graph_starts_at_first_layer)
    user_pass = inductor_options.pop("post_grad_custom_post_pass", None)
    if user_pass is None:
        user_pass = torch._inductor.config.post_grad_custom_post_pass
    inductor_options["post_grad_custom_post_pass"] = graph_pass if user_pass is None else _Chain(graph_pass, user_pass)
    return graph_pass, inductor_options


def indexcache_backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None, **kw):
    """A ``torch.compile`` backend: Inductor (C++ on CPU, Triton on GPU) plus the IndexCache pass."""
    from torch._inductor.compile_fx import compile_fx

    merged = dict(options or {})
    merged.update(kw.pop("config_patches", {}) or {})
    if kw.get("mode") not in (None, "default"):
        raise ValueError(f"indexcache_backend: mode={kw['mode']!r} is not supported; use options instead")
    # issue 11: tell the pass whether this dynamo graph starts at the model's top (see frames.py)
    graph_pass, patches = indexcache_inductor_patches(merged, dynamo_graph_starts_at_first_layer())
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    if not graph_pass.reports:
        _report_cache_hit(graph_pass)
    return compiled


def _report_cache_hit(graph_pass: IndexCachePass) -> None:
    """Inductor served the graph from its FX graph cache, so the pass did not run: say so."""
    note = (
        "served from Inductor's FX graph cache: the pass ran when the entry was made, under this "
        f"same config and code (uuid {graph_pass.uuid()[:12]}); no per-layer detail this time"
    )
    report = IndexCacheReport(graph_pass.config, [], "FX graph cache", 0, [note], "cached graph")
    graph_pass.reports.append(report)
    publish(report)


def aten_graph_backend(compile_graph: Callable[[torch.fx.GraphModule], Callable], **aot_options: Any):
    """A ``torch.compile`` backend that runs AOTAutograd's forward ATen graph eagerly, no Inductor.

    ``compile_graph(module)`` may inspect or edit the graph module and returns what to call
    instead (usually ``module.forward`` after ``module.recompile()``). The debugging backend,
    the pattern tools and the tests all build on it.
    """

    def backend(gm: torch.fx.GraphModule, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def forward_compiler(module: torch.fx.GraphModule, inputs):
            return make_boxed_func(compile_graph(module))

        return aot_autograd(fw_compiler=forward_compiler, **aot_options)(gm, example_inputs)

    return backend


def indexcache_eager_backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None):
    """The same rewrite on AOTAutograd's ATen graph, run eagerly (no Inductor codegen).

    For debugging and fast tests: the graph the pass sees is the pre-Inductor ATen graph,
    so a difference between this and ``indexcache_backend`` points at Inductor, not the pass.
    """
    config, rest = IndexCacheConfig.from_options(options)
    if rest:
        raise ValueError(f"indexcache_eager_backend: unknown options {sorted(rest)}; only IndexCache keys apply")
    # issue 11: tell the pass whether this dynamo graph starts at the model's top (see frames.py)
    graph_pass = IndexCachePass(config, graph_starts_at_first_layer=dynamo_graph_starts_at_first_layer())

    def rewrite(module: torch.fx.GraphModule):
        graph_pass(module.graph)
        module.recompile()
        return module.forward

    return aten_graph_backend(rewrite)(gm, example_inputs)
