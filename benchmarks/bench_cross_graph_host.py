"""Host cost of the cross-graph decision per layer call (CPU, no device work), and the end-to-end time of a
graph-broken decoder compiled with IndexCache across graphs vs. the same decoder compiled without IndexCache.

The decision (which layer, may it read, do the sizes match) is pure Python bookkeeping; this measures it by
running the wrapper with no-op variants, so the number is the overhead a layer call pays on the host.
Usage: python benchmarks/bench_cross_graph_host.py [--out benchmarks/results/cross_graph_host.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fx_indexcache as fic  # noqa: E402
from cross_graph_programs import D, LoopDecoder  # noqa: E402
from fx_indexcache.crossgraph.runtime import CrossGraphCallable  # noqa: E402


def _captured_callables(model, pattern):
    """Compile, and keep the CrossGraphCallable the backend returned (wrapped by AOTAutograd)."""
    found = []
    original = CrossGraphCallable.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        found.append(self)

    CrossGraphCallable.__init__ = keep
    try:
        compiled = torch.compile(model, backend=fic.indexcache_eager_backend, options={"index_topk_pattern": pattern})
        with torch.no_grad():
            compiled(torch.randn(2, 64, D))
    finally:
        CrossGraphCallable.__init__ = original
    return compiled, found


def host_cost(layers: int, repeats: int) -> float:
    model = LoopDecoder(layers)
    _, (wrapper,) = _captured_callables(model, "FS" * (layers // 2))
    args = {}

    def recording(name):
        def run(call_args):
            args.setdefault(name, call_args)
            return [torch.empty(0), torch.empty(0)]
        return run

    wrapper.as_is, wrapper.f_variant, wrapper.s_variant = recording("as_is"), recording("f"), recording("s")
    # the argument lists of each layer, recorded once through the real model loop
    per_layer = []
    for layer in model.layers:
        params = dict(layer.named_parameters())
        per_layer.append([params["indexer.wq"], torch.randn(2, 64, D), params["indexer.wk"], params["indexer.ww"],
                          params["wv"]])
    timeline_map = wrapper.maps[0]
    start = time.perf_counter()
    for _ in range(repeats):
        timeline_map.new_forward()
        for call_args in per_layer:
            wrapper(call_args)
    return (time.perf_counter() - start) / (repeats * layers) * 1e6


def end_to_end(layers: int, tokens: int, repeats: int) -> dict:
    x = torch.randn(2, tokens, D)
    out = {}
    for name, options in (("without IndexCache", {"use_index_cache": False}), ("FSFS... across graphs",
                                                                             {"index_topk_pattern": "FS" * (layers // 2)})):
        torch._dynamo.reset()
        model = LoopDecoder(layers)
        compiled = torch.compile(model, backend=fic.indexcache_eager_backend, options=options)
        with torch.no_grad():
            compiled(x)
            start = time.perf_counter()
            for _ in range(repeats):
                compiled(x)
        out[name] = (time.perf_counter() - start) / repeats * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cost = host_cost(layers=8, repeats=2000)
    e2e = end_to_end(layers=8, tokens=256, repeats=20)
    result = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor() or
              platform.machine(), "host_us_per_layer_call": cost, "end_to_end_ms_eager_backend": e2e}
    print(f"host decision per layer call: {cost:.1f} µs (torch {torch.__version__}, CPU, no-op variants)")
    print("| model call, 8 layers, 2 x 256 tokens, eager ATen backend | ms |\n|---|---|")
    for name, ms in e2e.items():
        print(f"| {name} | {ms:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
