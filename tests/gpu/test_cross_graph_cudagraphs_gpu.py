"""Issue 14 under CUDA graphs: graph-broken toy decoders compiled with mode="reduce-overhead" share across graphs.

The F graph writes its indices into a static buffer (a static, mutated input), the S graphs read it (a static
input): cudagraph trees capture every graph (no skip), replays equal the hand-written oracle, the S layers read.
"""

from __future__ import annotations

import pytest
import torch

from gpu_marks import needs_gpu

pytestmark = needs_gpu


def _gen(seed: int):
    return torch.Generator(device="cuda").manual_seed(seed)


def _uses(pattern: str) -> list[int]:
    import fx_indexcache as fic

    config = fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern)
    return [config.source_layer(i) if config.layer_kind(i) == "S" else i for i in range(len(pattern))]


@pytest.mark.parametrize("kind", ["per_call", "numbered"])
def test_graph_broken_decoder_replays_under_cuda_graphs(kind):
    import fx_indexcache as fic
    from cross_graph_programs import D, LoopDecoder, SegmentDecoder
    from fx_indexcache.crossgraph.runtime import CallAction

    torch._dynamo.reset()
    pattern = "FSFS" if kind == "per_call" else "FSSS"
    model = (LoopDecoder(4) if kind == "per_call" else SegmentDecoder(4)).cuda()
    extra = () if kind == "per_call" else (((0, 2), (2, 4)),)
    backend = fic.IndexCacheBackend(index_topk_pattern=pattern)
    compiled = torch.compile(model, backend=backend, mode="reduce-overhead", dynamic=False)
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    past = [torch.randn(2, 6, D, device="cuda", generator=_gen(10 + i)) for i in range(4)]
    want_reads = {1, 3} if kind == "per_call" else {2, 3}
    for seed in range(1, 6):  # warm-up, record, then replays; decode against a fixed cache
        x = torch.randn(2, 1, D, device="cuda", generator=_gen(seed))
        with torch.no_grad():
            out = compiled(x, past, *extra).clone()
            expected = (model.oracle(x, _uses(pattern), past) if kind == "per_call"
                        else model.oracle_segments(x, _uses(pattern), past, *extra))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        reads = {c.layer for c in fic.layer_calls(model, backend) if c.action is CallAction.READ}
        assert reads == want_reads, (seed, reads)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips  # no graph fell back
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and len(manager.ids_to_funcs) >= 2  # the F and S graphs run as CUDA graphs
    plans = [r.cross_graph for r in backend.reports if r.cross_graph is not None]
    assert plans and all(p.active for p in plans)
