"""Block indexers (MiniMax-M3) and pooled indexers (GLM-5.3-Flash): found, shared where provable, oracle-equal.

* MiniMax-M3 scores max-pooled q·k key blocks and keeps the top-k blocks per indexer head; the pass
  finds one block site per sparse layer (``detection/block_topk.py``), never the MoE router, and
  an S layer takes the F layer's block selection exactly as the oracle does (its indexer module
  patched to return the F layer's output), in prefill and decode with the model's own cache.
* GLM-5.3-Flash's k-pool width ``min(index_topk // kpool, pooled length)`` is a different unbacked
  symbol per layer; in prefill the pass proves the widths equal (``detection/symbolic.py``) and
  shares, in decode (masks read from each layer's own cache) it proves nothing and says so.
* Plain-torch block attention in two layers shares with other sizes than the tiny models, and a
  router, a sampler and a block top-k that feeds no attention are left alone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_indexcache as fic
import hf_oracle as H
from fx_indexcache.detection.block_topk import BlockTopkSite
from fx_indexcache.detection.layers import module_path
from fx_indexcache.detection.symbolic import SizeProver


def _run(tiny, patterns: dict[str, str], steps: int):
    """Trace once, run every pattern (prefill + ``steps`` decode steps) and its oracle."""
    untouched = H.prefill_and_decode(tiny.model, tiny, 12, steps)
    oracle, sources = {}, {}
    for key, pattern in patterns.items():
        with tiny.oracle(pattern) as shared:
            oracle[key] = H.prefill_and_decode(tiny.model, tiny, 12, steps)
        sources[key] = shared
    torch._dynamo.reset()
    backend = H.PatternSwitchBackend({key: {"index_topk_pattern": p} for key, p in patterns.items()})
    compiled = torch.compile(tiny.model, backend=backend)
    got = {}
    with H.dynamo_config(tiny):
        for key in patterns:
            with backend.use(key):
                got[key] = H.prefill_and_decode(compiled, tiny, 12, steps)
    return untouched, oracle, sources, backend, got


def test_minimax_block_indexer_shares_like_the_oracle():
    tiny = H.TINY_DSA_MODELS["minimax_m3_vl"]()
    patterns = {"FS": "FSF", "freq2": H.freq_pattern(3, 2), "all-F": "FFF"}
    untouched, oracle, sources, backend, got = _run(tiny, patterns, steps=2)
    assert tiny.dsa_layers == [0, 1, 2]
    for detection in backend.detections:
        assert [site.layer for site in detection.sites] == tiny.dsa_layers
        assert all(isinstance(site, BlockTopkSite) for site in detection.sites)
        assert all(site.module_path.endswith(f"{site.layer}.self_attn.indexer") for site in detection.sites)
        assert len(detection.ignored) == tiny.expected_router_topk  # the MoE routers, left alone
        assert all("indexer" not in (module_path(v.node) or "") for v in detection.ignored)
    for key in ("FS", "freq2"):
        assert sources[key] and any(not torch.equal(a, b) for a, b in zip(oracle[key], untouched))
        reports = backend.reports[key]
        for step, report in enumerate(reports):
            s_layers = [d for d in report.decisions if d.layer in sources[key]]
            shared = all(d.action == "shared" and d.source_layer == sources[key][d.layer] for d in s_layers)
            if step < 2:  # prefill and the first decode step trace with static shapes: provable, shared
                assert shared, [(d.layer, d.action, d.note) for d in report.decisions]
                assert torch.equal(got[key][step], oracle[key][step]), f"{key} step {step}"
            elif not shared:  # a dynamic-shape decode graph: each layer's cache length is its own symbol
                assert all(d.action == "left as is" and "key blocks" in d.note for d in s_layers)
    for mine, base in zip(got["all-F"], untouched):
        assert torch.equal(mine, base)


@pytest.mark.parametrize("drop_writes", [None, False, True])
def test_minimax_static_cache_generate_shares_in_every_step(drop_writes):
    """With transformers' static cache every graph has fixed shapes: k and the block count are provable, so
    prefill and every decode step share, and greedy generation equals the oracle's bitwise. With
    ``drop_shared_indexer_cache_writes`` the S layers' index-key cache writes go too (nothing reads them); left at
    None (the default) they go as well, since each graph holds all three layers of the model (proven), and with
    False they stay."""
    from fx_indexcache import IndexCacheEagerBackend, prepared_static_cache

    tiny = H.TINY_DSA_MODELS["minimax_m3_vl"]()
    ids = tiny.make_inputs(9)["input_ids"]

    def generate():
        # buffers allocated before the compiled call, so the graph writes them in place (copy_ into an input)
        cache = prepared_static_cache(tiny.model, batch_size=1, max_cache_len=ids.shape[1] + 3)
        with torch.no_grad():
            out = tiny.model.generate(ids, max_new_tokens=3, do_sample=False, past_key_values=cache,
                                      return_dict_in_generate=True, output_logits=True)
        return out.sequences, torch.stack(out.logits)

    untouched = generate()
    with tiny.oracle("FSS") as sources:
        expected = generate()
    assert sources == {1: 0, 2: 0} and not torch.equal(untouched[1], expected[1])
    torch._dynamo.reset()
    fic.clear_reports()
    if drop_writes:  # the writes must stay in the graph (as Inductor keeps them) to be dropped
        backend = _keeping_cache_writes(fic.IndexCacheConfig(
            use_index_cache=True, index_topk_pattern="FSS", drop_shared_indexer_cache_writes=True))
    else:
        backend = IndexCacheEagerBackend(index_topk_pattern="FSS", drop_shared_indexer_cache_writes=drop_writes)
    tiny.model.forward = torch.compile(tiny.model.forward, backend=backend)
    try:
        tokens, logits = generate()
    finally:
        del tiny.model.forward
    assert torch.equal(tokens, expected[0]) and torch.equal(logits, expected[1])
    reports = fic.reports() if drop_writes else backend.reports  # a backend object keeps its own reports
    assert len(reports) == 2  # prefill and one decode graph
    for report in reports:
        assert [(d.layer, d.action, d.source_layer) for d in report.decisions] == [
            (0, "computed", 0), (1, "shared", 0), (2, "shared", 0)]
        saved = [d.cache_bytes_saved for d in report.decisions]
        # one layer's index keys: batch 1 x 1 head x max_cache_len rows x index_head_dim fp32 values (prefill),
        # one row in decode
        rows = ids.shape[1] if report is reports[0] else 1
        expected_bytes = rows * tiny.config.index_head_dim * 4 if drop_writes is not False else 0
        assert saved == [0, expected_bytes, expected_bytes], saved
        if drop_writes is None:  # the report says why the default dropped them
            assert "all 3 decoder layers" in report.decisions[1].note, report.decisions[1].note


def _keeping_cache_writes(config: fic.IndexCacheConfig):
    """The eager ATen backend with input mutations kept in the graph, so the pass can drop cache writes."""
    from fx_indexcache.detection.frames import dynamo_graph_starts_at_first_layer
    from fx_indexcache.integrations.backend import aten_graph_backend

    def backend(gm, example_inputs):
        graph_pass = fic.IndexCachePass(config, graph_starts_at_first_layer=dynamo_graph_starts_at_first_layer())

        def rewrite(module):
            graph_pass(module.graph)
            module.recompile()
            return module.forward

        return aten_graph_backend(rewrite, keep_inference_input_mutations=True)(gm, example_inputs)

    return backend


def test_glm5_next_pooled_widths_are_proven_equal_in_prefill_only():
    tiny = H.build(H.SPECS["glm5_next"], num_layers=2)
    untouched, oracle, sources, backend, got = _run(tiny, {"FS": "FS"}, steps=1)
    assert sources["FS"] == {1: 0} and not torch.equal(oracle["FS"][0], untouched[0])
    prefill, decode = backend.reports["FS"]
    assert [(d.layer, d.action) for d in prefill.decisions] == [(0, "computed"), (1, "shared")]
    assert torch.equal(got["FS"][0], oracle["FS"][0])
    (left,) = decode.layers_left
    assert left.layer == 1 and "data-dependent sizes" in left.note and "not proven equal" in left.note


class _BlockAttention(nn.Module):
    """One layer of plain-torch block-sparse attention: q·k max-pooled into key blocks, top-k blocks kept."""

    def __init__(self, width: int, block: int, k: int) -> None:
        super().__init__()
        self.block, self.k = block, k
        self.indexer = nn.ModuleDict({"q": nn.Linear(width, 8, bias=False), "k": nn.Linear(width, 8, bias=False)})
        self.qkv = nn.Linear(width, 3 * width, bias=False)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.indexer["q"](x) @ self.indexer["k"](x).transpose(-1, -2)  # [B, S, S]
        blocks = scores.shape[-1] // self.block
        pooled = scores.view(*scores.shape[:-1], blocks, self.block).amax(-1)
        return pooled.topk(self.k, dim=-1).indices  # [B, S, k] key blocks

    def forward(self, x: torch.Tensor, shared: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = self.select(x) if shared is None else shared
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        keep = torch.zeros(*chosen.shape[:-1], x.shape[1] // self.block, dtype=torch.bool).scatter(-1, chosen, True)
        bias = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, -1e9).repeat_interleave(self.block, -1)
        weights = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        return x + weights @ v, chosen


class _BlockModel(nn.Module):
    def __init__(self, layers: int, width: int, block: int, k: int, shares: dict[int, int] | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_BlockAttention(width, block, k) for _ in range(layers))
        self.router = nn.Linear(width, 6, bias=False)
        self.shares = shares or {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = {}
        for index, layer in enumerate(self.layers):
            x, chosen[index] = layer(x, chosen.get(self.shares.get(index, -1)))
        experts = self.router(x).topk(2, dim=-1).indices  # a router top-k: a weight scores it
        return x + experts.sum(-1, keepdim=True).to(x.dtype)


def test_plain_torch_block_attention_shares_and_router_is_left_alone():
    torch.manual_seed(0)
    model = _BlockModel(layers=3, width=16, block=4, k=2).eval()
    x = torch.randn(2, 16, 16)
    oracle_model = _BlockModel(layers=3, width=16, block=4, k=2, shares={1: 0}).eval()
    oracle_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected, untouched = oracle_model(x), model(x)
    assert not torch.equal(expected, untouched)
    torch._dynamo.reset()
    backend = H.PatternSwitchBackend({"FSF": {"index_topk_pattern": "FSF"}})
    with torch.no_grad(), backend.use("FSF"):
        got = torch.compile(model, backend=backend)(x)
    (report,) = backend.reports["FSF"]
    assert [(d.layer, d.action) for d in report.decisions] == [(0, "computed"), (1, "shared"), (2, "computed")]
    assert report.router_topk == 1
    assert torch.equal(got, expected)


def test_block_sites_are_found_in_inductors_decomposed_form():
    """Inductor's post-grad graph spells masked_fill as where and softmax as exp(x − amax(x)): still three sites."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    from fx_indexcache.detection.registry import detect

    torch.manual_seed(0)
    model = _BlockModel(layers=3, width=16, block=4, k=2).eval()
    with torch.no_grad():
        graph = make_fx(model, decomposition_table=select_decomp_table())(torch.randn(1, 16, 16))
    ops = {str(node.target) for node in graph.graph.nodes}
    assert "aten._softmax.default" not in ops and "aten.exp.default" in ops  # the decomposed form is what we test
    detection = detect(graph.graph, graph_starts_at_first_layer=True, layer_count=3)  # order needs a stated count
    assert [site.layer for site in detection.sites] == [0, 1, 2]
    assert all(isinstance(site, BlockTopkSite) for site in detection.sites)
    assert len(detection.ignored) == 1  # the router


def _aten_graph(fn, *args) -> torch.fx.Graph:
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*args).graph


def test_block_topk_that_feeds_no_attention_or_scores_a_weight_is_no_site():
    from fx_indexcache.detection.registry import detect

    def returned_only(x, wq, wk):  # q·k block top-k whose indices are an output, not a mask
        scores = (x @ wq) @ (x @ wk).transpose(-1, -2)
        return scores.view(2, 8, 2, 4).amax(-1).topk(1, dim=-1).indices

    def router(x, w):  # block-pooled scores of a weight: a router, even with a softmax after it
        scores = (x @ w).view(2, 8, 2, 4).amax(-1)
        chosen = scores.topk(1, dim=-1).indices
        return torch.softmax(torch.zeros(2, 8, 2).scatter(-1, chosen, 1.0), -1)

    def sampler(x, w):  # top-k sampling over vocabulary logits
        values, indices = (x @ w).topk(3, dim=-1)
        return indices.gather(-1, torch.softmax(values, -1).argmax(-1, keepdim=True))

    x, w = torch.randn(2, 8, 8), torch.randn(8, 8)
    for fn, args in ((returned_only, (x, w, w)), (router, (x, w)), (sampler, (x, w))):
        detection = detect(_aten_graph(fn, *args), graph_starts_at_first_layer=True)
        assert not detection.sites, fn.__name__
        assert len(detection.ignored) == 1 and not detection.ignored[0].is_indexer, fn.__name__


def test_size_prover_equal_masks_only():
    """Two boolean-mask counts are equal when the masks are one value, not when they come from two inputs."""

    def counts(x, a, b):
        first = x[:, a.any(0)]
        second = x[:, a.any(0)] + 1  # the same mask, computed again
        third = x[:, b.any(0)]  # a mask from another input
        return first, second, third

    x, a, b = torch.randn(3, 5), torch.rand(3, 5) > 0.5, torch.rand(3, 5) > 0.5
    graph = _aten_graph_symbolic(counts, x, a, b)
    outputs = [n for n in graph.nodes if n.op == "output"][0].args[0]
    sizes = [n.meta["val"].shape[1] for n in outputs]
    assert len({str(size) for size in sizes}) == 3, sizes  # three distinct symbols: the check is not vacuous
    prover = SizeProver(graph)
    assert prover.same_size(sizes[0], sizes[1])
    assert not prover.same_size(sizes[0], sizes[2])
    assert "not proven equal" in prover.unproven(sizes[0], sizes[2])


def test_size_prover_item_of_one_value():
    """``.item()`` of the same value twice gives two unbacked symbols that the prover equates; of another, not."""

    def widths(x, a, b):
        first = torch.zeros(int(a.sum().item()))
        second = torch.ones(int(a.sum().item()))
        third = torch.ones(int(b.sum().item()))
        return first, second, third

    x, a, b = torch.randn(3), torch.rand(3, 5) > 0.5, torch.rand(3, 5) > 0.5
    graph = _aten_graph_symbolic(widths, x, a, b)
    outputs = [n for n in graph.nodes if n.op == "output"][0].args[0]
    sizes = [n.meta["val"].shape[0] for n in outputs]
    assert len({str(size) for size in sizes}) == 3, sizes  # three distinct symbols: the check is not vacuous
    prover = SizeProver(graph)
    assert prover.same_size(sizes[0], sizes[1]) and not prover.same_size(sizes[1], sizes[2])


def _aten_graph_symbolic(fn, *args) -> torch.fx.Graph:
    graphs = []

    def keep(gm):
        graphs.append(gm)
        return gm

    from fx_indexcache.integrations.backend import aten_graph_backend

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        torch.compile(fn, backend=aten_graph_backend(keep), fullgraph=True)(*args)
    (graph,) = graphs
    return graph.graph


def test_block_site_is_detected_by_fic_detect_on_minimax_export():
    """Export (no module-path numbering needed beyond what export keeps) finds the same block sites."""
    tiny = H.build(H.SPECS["minimax_m3_vl"], num_layers=2)
    inputs = tiny.make_inputs(12)
    with torch.no_grad():
        program = torch.export.export(tiny.model, (), dict(inputs, use_cache=False), strict=False)
    with tiny.oracle("FS"):
        expected = H.prefill(tiny.model, tiny)
    config = fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern="FS")
    report = fic.apply_index_cache_to_exported_program(program, config)
    assert [(d.layer, d.action) for d in report.decisions] == [(0, "computed"), (1, "shared")]
    got = H.output_of(program.module()(**inputs, use_cache=False), tiny.spec)
    assert torch.equal(got, expected)
