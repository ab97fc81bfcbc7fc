"""Products Inductor pads for alignment are read as the plain products they equal (detection/padded_products.py).

On CUDA Inductor's ``pad_mm`` times a padded product against the plain one and keeps the faster, so the same model
compiles to either form from one process to the next: the generate() test on an H100 failed one cold run in three
with every indexer of its prefill graph unread (the padded q·k's key axis is the padded length). Here the padded
form is forced on CPU (``force_shape_pad``, the device check opened), and built by hand over random shapes: the
restored graph computes what the padded one did, and the detector then finds the site; any other padding or
slicing is left as it is, and its top-k is then a site or hidden, never taken for a router.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from fx_indexcache.detection.padded_products import restore_padded_products
from fx_indexcache.detection.registry import detect
from fx_indexcache.graph_utils import is_call

aten = torch.ops.aten
K = 3
#: Forms that are not Inductor's padding: each changes what the product's kept region holds, or reads it twice.
NOT_RESTORED = ["left_pad", "nonzero_fill", "slice_from_one", "second_reader"]


def _scores(x, wq, wk, ww, heads, op, pads, form):
    """Σ_h w·ReLU(q·k) over keys, q·k as ``mm`` ([T·H, D] @ [D, S]) or ``bmm`` (per head), in a padded ``form``."""
    t, s = x.shape[0], x.shape[0]
    q, k, w = (x @ wq).view(t, heads, -1), x @ wk, x @ ww
    if op == "mm":
        a, b = q.reshape(t * heads, -1), k.t()
    else:
        a, b = q.permute(1, 0, 2), k.t().unsqueeze(0).expand(heads, -1, -1)
    m_pad, k_pad, n_pad = pads
    fill = 1.0 if form == "nonzero_fill" else 0.0
    batch = [] if op == "mm" else [0, 0]
    a_pads = [0, k_pad, m_pad, 0] if form == "left_pad" else [0, k_pad, 0, m_pad]
    multiply = aten.mm if op == "mm" else aten.bmm
    product = multiply(aten.constant_pad_nd(a, a_pads + batch, fill),
                       aten.constant_pad_nd(b, [0, n_pad, 0, k_pad] + batch, fill))
    rows, cols = product.dim() - 2, product.dim() - 1
    start = 1 if form == "slice_from_one" else 0
    kept = aten.slice(aten.slice(product, rows, start, start + a.shape[-2]), cols, 0, b.shape[-1])
    extra = product.sum() if form == "second_reader" else 0.0
    logits = (kept.view(t, heads, s) if op == "mm" else kept.permute(1, 0, 2)).relu()
    score = (logits * w.unsqueeze(-1)).sum(1) + extra
    return score.topk(K, dim=-1).indices, score


def _graph(op, pads, form, t=7, d=5, heads=2, head_dim=3):
    torch.manual_seed(0)
    args = (torch.randint(-3, 4, (t, d)).double(), torch.randint(-2, 3, (d, heads * head_dim)).double(),
            torch.randint(-2, 3, (d, head_dim)).double(), torch.randint(-2, 3, (d, heads)).double())
    module = make_fx(lambda *a: _scores(*a, heads, op, pads, form), tracing_mode="fake")(*args)
    return module, args


pads_strategy = st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)).filter(any)


@settings(max_examples=40, deadline=None)
@given(op=st.sampled_from(["mm", "bmm"]), pads=pads_strategy)
def test_a_padded_score_product_is_restored_and_computes_the_same(op, pads):
    module, args = _graph(op, pads, "inductor")
    before = module(*args)
    assert any(is_call(n, {aten.constant_pad_nd}) for n in module.graph.nodes)  # the form under test is there
    assert restore_padded_products(module.graph) == 1
    module.graph.lint()
    module.recompile()
    assert not any(is_call(n, {aten.constant_pad_nd, aten.slice}) for n in module.graph.nodes)
    after = module(*args)
    assert torch.equal(before[1], after[1]) and torch.equal(before[0], after[0])  # integer-valued: exact sums
    detection = detect(module.graph)
    assert len(detection.sites) == 1 and not detection.hidden


@settings(max_examples=40, deadline=None)
@given(op=st.sampled_from(["mm", "bmm"]), pads=pads_strategy, form=st.sampled_from(NOT_RESTORED))
def test_any_other_padding_is_left_and_its_top_k_is_never_a_router(op, pads, form):
    if form in ("left_pad", "slice_from_one") and not pads[0]:
        pads = (1, *pads[1:])
    module, args = _graph(op, pads, form)
    before = module(*args)
    nodes = len(module.graph.nodes)
    detection = detect(module.graph)
    assert detection.padded_products_restored == 0 and len(module.graph.nodes) == nodes
    module.recompile()
    assert torch.equal(before[1], module(*args)[1])
    verdicts = [v for v in detection.ignored if is_call(v.node, {aten.topk})]
    assert len(detection.sites) == 1 or (len(verdicts) == 1 and verdicts[0].undecided and detection.hidden), (
        [v.reason for v in verdicts])


def test_restoring_is_idempotent_and_counts_each_product_once():
    module, args = _graph("bmm", (2, 1, 3), "inductor")
    assert restore_padded_products(module.graph) == 1
    assert restore_padded_products(module.graph) == 0


@pytest.fixture
def inductor_pads_every_product(monkeypatch):
    """Inductor's choice on a card where padding timed faster, made on CPU: every unaligned mm/bmm is padded."""
    pad_mm = pytest.importorskip("torch._inductor.fx_passes.pad_mm")
    if not hasattr(pad_mm, "check_device") or not hasattr(pad_mm, "has_triton"):
        pytest.skip("this torch's pad_mm has no device check to open")
    monkeypatch.setattr(pad_mm, "check_device", lambda a, b: True)
    monkeypatch.setattr(pad_mm, "has_triton", lambda: True)
    with torch._inductor.config.patch(force_shape_pad=True, fx_graph_cache=False):
        yield


def test_transformers_v32_under_inductors_padding_shares_prefill_and_decode(inductor_pads_every_product):
    import hf_oracle as H

    from fx_indexcache import IndexCacheBackend, prepared_static_cache

    torch._dynamo.reset()
    tiny = H.TINY_DSA_MODELS["deepseek_v32"]()
    model = tiny.model
    ids = tiny.make_inputs(9, seed=0)["input_ids"]
    cache = prepared_static_cache(model, 1, 13)

    def generate():
        cache.reset()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=2, do_sample=False, past_key_values=cache, disable_compile=True,
                                 return_dict_in_generate=True, output_logits=True)
        return out.sequences, torch.stack(out.logits)

    with tiny.oracle("FSS"):
        want_tokens, want_logits = generate()
    backend = IndexCacheBackend(index_topk_pattern="FSS")
    model.forward = torch.compile(model.forward, backend=backend)
    tokens, logits = generate()
    assert [r.indexers_removed for r in backend.reports] == [2, 2], "\n".join(r.format() for r in backend.reports)
    # the padded form was there (the test is not vacuous): each graph restored its indexers' products
    assert all(r.padded_products_restored >= 3 for r in backend.reports), [r.format() for r in backend.reports]
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
