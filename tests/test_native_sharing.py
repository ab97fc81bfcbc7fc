"""A model that already shares its indices is seen and respected (issue 29, item 3).

transformers' GLM-5 applies ``indexer_types`` itself: a "shared" layer builds no indexer and reads the previous
layer's indices. The backend without keys applies the keys the model ships (so nothing changes), the report says
which layers the model shares, and a requested pattern that marks such a layer F is refused naming it.
"""

from __future__ import annotations

import pytest
import torch

import fx_indexcache as fic
from fx_indexcache.models import tiny_transformers as tt

TYPES = ["full", "shared", "shared", "full"]


def _glm():
    return tt.build(tt.SPECS["glm_moe_dsa"], num_layers=4, indexer_types=TYPES)


def test_the_backend_applies_the_keys_the_model_ships_and_changes_nothing():
    tiny = _glm()
    eager = tt.prefill(tiny.model, tiny)
    backend = fic.IndexCacheEagerBackend()
    with tt.dynamo_config(tiny):
        out = tt.prefill(torch.compile(tiny.model, backend=backend), tiny)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    (report,) = [r for r in backend.reports if r.decisions]
    assert report.config.indexer_types == tuple(TYPES)
    assert [d.layer for d in report.decisions] == [0, 3] and report.indexers_removed == 0
    assert "the model already shares: layers 0, 1, 2 read layer 0's indices" in report.format()


def test_a_pattern_against_the_model_s_own_sharing_is_refused_naming_the_layers():
    tiny = _glm()
    with tt.dynamo_config(tiny), pytest.raises(Exception, match=r"marks layers 2 F against the model's own S"):
        tt.prefill(torch.compile(tiny.model, backend=fic.IndexCacheEagerBackend(index_topk_pattern="FSFS")), tiny)
