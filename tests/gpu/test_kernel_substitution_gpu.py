"""GPU checks of ``substitute_fused_indexer`` inside Inductor-compiled models (skipped without CUDA + Triton).

Each test compiles the same model twice with Inductor (post-grad pass: IndexCache rewrite, then
detection, with and without the substitution) and checks that every F layer's score went to the fused
kernel, that the generated code calls it, and that outputs agree to bf16 tolerance with top-k sets
that agree except at (near-)ties.
"""

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

from fx_indexcache import IndexCacheConfig, IndexCachePass, detect
from fx_indexcache.fuse.substitute import substitute_fused_indexer
from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel
from gpu_marks import needs_gpu


pytestmark = needs_gpu


class _Pass(CustomGraphPass):
    def __init__(self, substitute: bool, pattern: str | None) -> None:
        self.substitute = substitute
        self.index_cache = IndexCachePass(IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern, fuse_indexer_kernel=False)) if pattern else None
        self.records: list = []

    def __call__(self, graph) -> None:
        if self.index_cache is not None:
            self.index_cache.run(graph)
        if self.substitute:
            self.records += substitute_fused_indexer(graph, detect(graph).sites)

    def uuid(self):
        return None


def _compile(model, substitute: bool, pattern: str | None):
    graph_pass = _Pass(substitute, pattern)
    opts = {"post_grad_custom_post_pass": graph_pass, "fx_graph_cache": False}
    return torch.compile(model, backend="inductor", options=opts, dynamic=False), graph_pass


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1, a.shape[-1]).cpu(), b.reshape(-1, b.shape[-1]).cpu()
    return sum(len(set(x.tolist()) & set(y.tolist())) / len(y) for x, y in zip(a, b)) / a.shape[0]


@pytest.mark.parametrize("pattern", [None, "FSFS"])
def test_reference_model_bf16_fused_equals_inductor(pattern):
    cfg = DSAModelConfig.tiny(
        num_layers=4, first_k_dense_layers=4, index_n_heads=16, index_head_dim=64, index_topk=64, max_seq_len=512
    )
    model = ReferenceDSAModel(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 192), device="cuda")
    with torch.no_grad():
        base, _ = _compile(model, False, pattern)
        fused, graph_pass = _compile(model, True, pattern)
        want_logits, want_idx = base(ids, None, 0, True)
        (got_logits, got_idx), code = run_and_get_code(fused, ids, None, 0, True)
    f_layers = [i for i in range(4) if pattern is None or pattern[i] == "F"]
    assert [r.layer for r in graph_pass.records if r.fused] == f_layers, graph_pass.records
    assert any("indexer_logits" in src for src in code)
    rel = (got_logits.double() - want_logits.double()).norm() / want_logits.double().norm()
    assert rel < 2e-2, rel
    for layer in f_layers:
        assert _overlap(got_idx[layer], want_idx[layer]) > 0.98


def test_unsupported_dims_are_left_with_a_note():
    cfg = DSAModelConfig.tiny(num_layers=2, first_k_dense_layers=2, index_head_dim=24, qk_rope_head_dim=16)
    model = ReferenceDSAModel(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (1, 32), device="cuda")
    with torch.no_grad():
        fused, graph_pass = _compile(model, True, None)
        fused(ids)
    assert graph_pass.records and all(not r.fused and "head dim 24" in r.detail for r in graph_pass.records), graph_pass.records


def test_fp32_model_is_left_with_a_note():
    cfg = DSAModelConfig.tiny(num_layers=2, first_k_dense_layers=2)
    model = ReferenceDSAModel(cfg, seed=0, dtype=torch.float32, device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (1, 32), device="cuda")
    with torch.no_grad():
        fused, graph_pass = _compile(model, True, None)
        fused(ids)
    assert graph_pass.records and all(not r.fused and "bf16 or fp16" in r.detail for r in graph_pass.records), graph_pass.records


def test_transformers_v32_bf16_fused():
    pytest.importorskip("transformers")
    from fx_indexcache.models import tiny_transformers as hf_models

    try:
        tiny = hf_models.build(hf_models.SPECS["deepseek_v32"], index_n_heads=4, index_head_dim=32, index_topk=8)
    except Exception as e:  # transformers without DeepSeek-V3.2
        pytest.skip(f"no DeepseekV32 in this transformers: {e}")
    model = tiny.model.to(device="cuda", dtype=torch.bfloat16)
    ids = tiny.make_inputs(40)["input_ids"].cuda()
    with torch.no_grad():
        base, _ = _compile(model, False, None)
        fused, graph_pass = _compile(model, True, None)
        want = base(input_ids=ids, use_cache=False).logits
        got = fused(input_ids=ids, use_cache=False).logits
    assert sum(r.fused for r in graph_pass.records) == len(tiny.dsa_layers), graph_pass.records
    rel = (got.double() - want.double()).norm() / want.double().norm()
    assert rel < 2e-2, rel


def test_backend_default_fuses_f_layers_and_drops_s_layers():
    """What a user gets from ``backend=indexcache_backend`` on CUDA: fused F layers, S layers gone."""
    import fx_indexcache
    from fx_indexcache import indexcache_backend

    cfg = DSAModelConfig.tiny(
        num_layers=4, first_k_dense_layers=4, index_n_heads=16, index_head_dim=64, index_topk=64, max_seq_len=512
    )
    model = ReferenceDSAModel(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (2, 192), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    options = {"index_topk_pattern": "FSFS", "fx_graph_cache": False}
    with torch.no_grad():
        base, _ = _compile(model, False, "FSFS")
        want_logits, want_idx = base(ids, None, 0, True)
        torch._dynamo.reset()
        fx_indexcache.clear_reports()  # the baseline's IndexCachePass published one too
        fused = torch.compile(model, backend=indexcache_backend, options=options, dynamic=False)
        (got_logits, got_idx), code = run_and_get_code(fused, ids, None, 0, True)
    (report,) = fx_indexcache.reports()
    assert report.pattern == "FSFS" and report.indexers_removed == 2
    assert report.indexers_fused == 2, report.fusions
    assert sum(src.count("indexer_logits") > 0 for src in code) >= 1
    rel = (got_logits.double() - want_logits.double()).norm() / want_logits.double().norm()
    assert rel < 2e-2, rel
    for layer in (1, 3):  # S layers hold exactly their F layer's indices
        assert torch.equal(got_idx[layer], got_idx[layer - 1])
    for layer in (0, 2):
        assert _overlap(got_idx[layer], want_idx[layer]) > 0.98


def test_backend_under_inductors_shape_padding_still_shares_and_fuses():
    """Inductor's ``pad_mm`` may pad the indexer's products on a card (whether is decided by timing them): forced
    here, the pass restores them, so S layers still go and F layers still reach the fused kernel."""
    import fx_indexcache
    from fx_indexcache import indexcache_backend

    cfg = DSAModelConfig.tiny(
        num_layers=4, first_k_dense_layers=4, index_n_heads=16, index_head_dim=64, index_topk=64, max_seq_len=512
    )
    model = ReferenceDSAModel(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (2, 190), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        base, _ = _compile(model, False, "FSFS")
        want_logits, want_idx = base(ids, None, 0, True)
        torch._dynamo.reset()
        fx_indexcache.clear_reports()
        options = {"index_topk_pattern": "FSFS", "fx_graph_cache": False, "force_shape_pad": True}
        fused = torch.compile(model, backend=indexcache_backend, options=options, dynamic=False)
        got_logits, got_idx = fused(ids, None, 0, True)
    (report,) = fx_indexcache.reports()
    assert report.padded_products_restored >= 4, report.format()  # two products per computing layer were padded
    assert report.pattern == "FSFS" and report.indexers_removed == 2, report.format()
    assert report.indexers_fused == 2, report.format()
    rel = (got_logits.double() - want_logits.double()).norm() / want_logits.double().norm()
    assert rel < 2e-2, rel
    for layer in (1, 3):
        assert torch.equal(got_idx[layer], got_idx[layer - 1])
    for layer in (0, 2):
        assert _overlap(got_idx[layer], want_idx[layer]) > 0.98
