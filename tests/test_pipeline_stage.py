"""A pipeline stage rebuilt from ``layers[2:]`` numbers its layers from 0 (issue 30, item 3, on the CPU).

Read as global numbers, its paths would apply the pattern's first characters to layers 2 and 3: silently wrong.
Where the model's layer count is known (here from the pattern's length) and the stage's layer list is shorter,
the pass refuses the numbering unless told the stage's first global layer (``stage_first_layer``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_indexcache as fic
from dsa_programs import ModuleDSA, inputs
from fx_indexcache.detection.registry import UnknownLayerIndex


class Stage(nn.Module):
    """Layers ``first..`` of a ``ModuleDSA``, in a list of their own (paths ``layers.0``, ``layers.1``)."""

    def __init__(self, full: ModuleDSA, first: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(list(full.layers)[first:])

    def forward(self, x, uses=None):
        cache = {}
        for i, layer in enumerate(self.layers):
            cache[i] = layer.indexer(x)
            x = layer(x, cache[uses[i]] if uses is not None else cache[i])
        return x


def _run(stage, **options):
    backend = fic.IndexCacheEagerBackend(**options)
    with torch.no_grad():
        return torch.compile(stage, backend=backend)(inputs()), backend.reports


def test_a_stage_numbered_from_zero_is_refused_not_shifted(caplog):
    """FSFF read locally would make stage layer 1 (global 3) read layer 0 (global 2); globally both are F."""
    stage = Stage(ModuleDSA(4), first=2)
    with caplog.at_level("WARNING", logger="fx_indexcache"):
        out, (report,) = _run(stage, index_topk_pattern="FSFF")
    assert report.layer_index_unknown is UnknownLayerIndex.STAGE_NUMBERED_FROM_ZERO
    assert report.indexers_removed == 0 and "2 blocks in the list, 4 decoder layers" in report.format()
    assert any("stage_first_layer" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        untouched, local = stage(inputs()), stage(inputs(), [0, 0])
    assert not torch.equal(untouched, local)  # the local reading would show
    torch.testing.assert_close(out, untouched, rtol=0, atol=0)


@pytest.mark.parametrize(("pattern", "uses"), [("FFFS", [0, 0]), ("FSFF", [0, 1])])
def test_a_stage_told_its_first_layer_applies_the_global_characters(pattern, uses):
    stage = Stage(ModuleDSA(4), first=2)
    out, (report,) = _run(stage, index_topk_pattern=pattern, stage_first_layer=2)
    assert [d.layer for d in report.decisions] == [2, 3]
    assert report.indexers_removed == (1 if uses == [0, 0] else 0)
    with torch.no_grad():
        torch.testing.assert_close(out, stage(inputs(), uses), rtol=0, atol=0)


def test_a_bad_stage_first_layer_is_named():
    with pytest.raises(ValueError, match=r"stage_first_layer=-1 is not allowed; it must be an int >= 0"):
        fic.IndexCacheBackend(stage_first_layer=-1)
