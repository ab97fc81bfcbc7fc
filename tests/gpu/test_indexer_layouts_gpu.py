"""Every layout of ``tests/indexer_layouts.py`` on the GPU: fused by the substitution vs plain Inductor.

Each layout is compiled twice with Inductor (post-grad pass: the substitution over the graph's top-k
nodes, or nothing); the fused variant must have rewritten the site (its record, and the generated code
calls ``indexer_logits`` and ``topk_indices``), its masked scores must match Inductor's to fp32
rounding (bf16 q/k are exact in fp32, so only the accumulation order differs) with the same -inf
pattern, and its top-k sets must agree except at near-ties.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_marks import needs_gpu  # noqa: E402
from indexer_layouts import LAYOUTS, make_inputs  # noqa: E402

from fx_indexcache.fuse.substitute import substitute_fused_indexer  # noqa: E402


pytestmark = needs_gpu


class _Substitute(CustomGraphPass):
    def __init__(self) -> None:
        self.records = []

    def __call__(self, graph) -> None:
        sites = [n for n in graph.nodes if n.target == torch.ops.aten.topk.default]
        self.records += substitute_fused_indexer(graph, sites)

    def uuid(self):
        return None


def _compile(fn, graph_pass):
    opts = {"fx_graph_cache": False}
    if graph_pass is not None:
        opts["post_grad_custom_post_pass"] = graph_pass
    torch._dynamo.reset()
    return torch.compile(fn, backend="inductor", options=opts, dynamic=False)


CASES = [(layout, 96) for layout in LAYOUTS] + [(LAYOUTS[0], 1), (LAYOUTS[5], 1)]  # every layout; decode twice


@pytest.mark.parametrize("layout,S", CASES, ids=lambda v: getattr(v, "name", f"S{v}"))
def test_layout_fused_matches_inductor(layout, S):
    args = make_inputs(layout, B=2, S=S, T=1500, T_max=2048, H=16, D=64, topk=256, device="cuda", seed=S)
    graph_pass = _Substitute()
    with torch.no_grad():
        want_score, want_idx = _compile(layout.fn, None)(*args)
        (got_score, got_idx), code = run_and_get_code(_compile(layout.fn, graph_pass), *args)
    assert [r.fused for r in graph_pass.records] == [True], graph_pass.records
    assert any("indexer_logits" in src for src in code) and any("topk_indices" in src for src in code)
    assert torch.equal(torch.isneginf(got_score), torch.isneginf(want_score))
    fin = torch.isfinite(want_score)
    rel = ((got_score[fin].double() - want_score[fin].double()).norm() / want_score[fin].double().norm()).item()
    assert rel < 1e-5, rel
    rows_g, rows_w = got_idx.reshape(-1, got_idx.shape[-1]), want_idx.reshape(-1, want_idx.shape[-1])
    hit = torch.zeros(rows_w.shape[0], want_score.shape[-1], device="cuda").scatter_(1, rows_w, 1.0)
    overlap = torch.gather(hit, 1, rows_g.long()).mean().item()
    assert overlap > 0.995, overlap
