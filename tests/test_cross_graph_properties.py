"""Issue 14, property: layer graphs called in any order, with any shapes, never read stale indices.

Hypothesis draws sequences of model calls, each running a subset of the layers in any order, at a
drawn length, with or without a decode cache whose length may differ per layer. After each call the
compiled output must equal the oracle that lets exactly the layers that read (per ``layer_calls``)
take their F layer's indices from *this* call; and a layer may read exactly when its F layer ran in
this call and the layers since ran consecutively, with the same key width.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fx_indexcache as fic
from cross_graph_programs import D, LoopDecoder
from fx_indexcache.rewrite import cross_graph
from fx_indexcache.rewrite.cross_graph import CallAction

N = 4
PATTERNS = ("FSSS", "FSFS", "FFSF")
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

_call = st.tuples(
    st.lists(st.integers(0, N - 1), min_size=1, max_size=N, unique=True),  # the layers, in call order
    st.sampled_from([3, 5]),  # new tokens (a decode step takes the first of them only)
    st.sampled_from([None, (4, 4, 4, 4), (4, 6, 4, 6), (6, 6, 4, 4)]),  # per-layer cache lengths
    st.integers(0, 2**16),
)


def _may_read(config, order: list[int], position: int, widths) -> bool:
    layer = order[position]
    source = config.source_layer(layer) if config.layer_kind(layer) == "S" else None
    if source is None:
        return False
    start = position - (layer - source)
    if start < 0 or order[start:position] != list(range(source, layer)):
        return False
    return widths is None or widths[layer] == widths[source]


@SETTINGS
@given(pattern=st.sampled_from(PATTERNS), calls=st.lists(_call, min_size=1, max_size=4))
def test_out_of_order_calls_read_only_what_this_call_published(pattern, calls):
    config = fic.IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern)
    model, compiled = _MODELS.get(pattern) or _MODELS.setdefault(pattern, _compiled(pattern))
    for order, tokens, widths, seed in calls:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(2, tokens if widths is None else 1, D, generator=gen)
        past = None if widths is None else [torch.randn(2, w, D, generator=gen) for w in widths]
        with torch.no_grad():
            out = compiled(x, past, order)
            records = {call.layer: call for call in cross_graph.layer_calls(model)}
            assert sorted(records) == sorted(order)
            read = {i for i, call in records.items() if call.action is CallAction.READ}
            assert read == {layer for p, layer in enumerate(order) if _may_read(config, order, p, widths)}
            uses = [config.source_layer(i) if i in read else i for i in range(N)]
            torch.testing.assert_close(out, model.oracle(x, uses, past, order), rtol=0, atol=0)


_MODELS: dict = {}


def _compiled(pattern: str):
    model = LoopDecoder(N, seed=len(_MODELS))
    return model, torch.compile(model, backend=fic.indexcache_eager_backend, options={"index_topk_pattern": pattern})


def test_reading_happens_in_the_drawn_cases():
    """Guard against a vacuous property: the plain in-order call reads in every pattern drawn."""
    for pattern in PATTERNS:
        model = LoopDecoder(N)
        with torch.no_grad():
            torch.compile(model, backend=fic.indexcache_eager_backend,
                          options={"index_topk_pattern": pattern})(torch.randn(2, 3, D))
        assert any(call.action is CallAction.READ for call in cross_graph.layer_calls(model))
