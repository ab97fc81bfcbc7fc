"""Property test: which sorts are indexer top-k (``detection/sort_topk.py``), and that the answer is what runs.

Hypothesis draws how a layer cuts its sorted scores: where the cut starts, its step, whether the sorted values are
read too, the sort's direction and stability. Only a cut of the first k keys (start 0, step 1) whose values nothing
reads selects k keys as a top-k does; such layers share like the hand-written oracle, and every other stack is left
exactly as written, with no site reported (the pass must not take a sort it cannot prove for a selection).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import test_odd_indexers as odd

SETTINGS = settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _cut_indexer(start: int, step: int, values_used: bool, descending: bool, stable: bool):
    def forward(self, x):
        ordered = torch.sort(self.scores(x), dim=-1, descending=descending, stable=stable)
        stop = start + step * self.k
        indices = ordered.indices[..., start:stop:step]
        if values_used:  # the values weight the selected keys: the sort is not a selection of indices alone
            return indices, ordered.values[..., start:stop:step]
        return indices

    return forward


@SETTINGS
@given(start=st.sampled_from([0, 0, 1]), step=st.sampled_from([1, 1, 2]), values_used=st.booleans(),
       descending=st.booleans(), stable=st.booleans())
@example(start=0, step=1, values_used=False, descending=True, stable=False)  # a site: shared
@example(start=0, step=1, values_used=False, descending=False, stable=True)  # the k smallest: still a selection
@example(start=1, step=1, values_used=False, descending=True, stable=False)  # skips the best key: no site
@example(start=0, step=2, values_used=False, descending=True, stable=False)  # every other key: no site
@example(start=0, step=1, values_used=True, descending=True, stable=False)  # values read: no site
def test_only_a_leading_cut_of_indices_is_a_site_and_it_shares_like_the_oracle(start, step, values_used, descending,
                                                                              stable):
    model, x = odd._toy(["plain"] * 3)
    for layer in model.layers:
        layer.indexer.forward = _cut_indexer(start, step, values_used, descending, stable).__get__(layer.indexer)
    pattern = "FSS"
    out, report = odd._compile(model, x, pattern)
    is_site = start == 0 and step == 1 and not values_used
    if is_site:
        odd._assert_shares(report, pattern)
        expected = odd.run(model, x, pattern)
        assert not torch.allclose(expected, odd.run(model, x, "FFF")), "sharing must change the output"
        torch.testing.assert_close(out, expected)
    else:
        assert report.decisions == [] and report.indexers_removed == 0
        with torch.no_grad():
            torch.testing.assert_close(out, model(x))
