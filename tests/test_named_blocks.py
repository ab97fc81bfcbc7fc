"""Blocks numbered by their names, not held in a list: attributes (``self.block_1``).

A pattern numbers decoder layers by position. A number an author writes in a block's name may count from 1, or
be registered out of order; read as a layer number it shifts the pattern by one layer, silently (with
``index_topk_freq`` no pattern length catches it). The rule: such numbers are layers only where the blocks, in
the order the model registers them, are numbered 0, 1, 2, ...; otherwise the layers are unknown and compute, and
the report says why. Each model is checked against its hand-written IndexCache (pattern by position). A
``ModuleDict``'s keys stay the layers' global numbers (torchtitan keys its pipeline stages so).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_indexcache as fic
from hybrid_programs import D, H, HD, inputs, read, score_topk

PATTERN = "FSFS"


class Block(nn.Module):
    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.wq = nn.Parameter(torch.randn(D, H * HD, generator=gen))
        self.wk = nn.Parameter(torch.randn(D, HD, generator=gen))
        self.ww = nn.Parameter(torch.randn(D, H, generator=gen))
        self.wv = nn.Parameter(torch.randn(D, D, generator=gen))

    def forward(self, x, indices=None):
        if indices is None:
            indices = score_topk(x, self.wq, self.wk, self.ww)
        return read(x, indices, self.wv), indices


class Attributes(nn.Module):
    """Blocks as attributes ``block_<n>``, registered in the order ``numbers`` gives, run in registration order."""

    def __init__(self, numbers: list[int]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.names = [f"block_{n}" for n in numbers]
        for name in self.names:
            setattr(self, name, Block(gen))

    def forward(self, x, pattern=None):
        indices = None
        for position, name in enumerate(self.names):
            x, indices = getattr(self, name)(x, indices if pattern and pattern[position] == "S" else None)
        return x


class Dict(nn.Module):
    """Blocks in an ``nn.ModuleDict`` keyed by ``numbers`` (as strings), run in its order."""

    def __init__(self, numbers: list[int]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleDict({str(n): Block(gen) for n in numbers})

    def forward(self, x, pattern=None):
        indices = None
        for position, block in enumerate(self.layers.values()):
            x, indices = block(x, indices if pattern and pattern[position] == "S" else None)
        return x


CASES = [
    (Attributes, [0, 1, 2, 3], True),
    (Attributes, [1, 2, 3, 4], False),  # counted from 1
    (Attributes, [1, 0, 2, 3], False),  # registered out of order: the second block run is block_0
    (Dict, [0, 1, 2, 3], True),
]


def _check(model, got, proven: bool, decisions, unknown_text: str):
    with torch.no_grad():
        want = model(inputs(), PATTERN if proven else None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if proven:
        assert [d.action.value for d in decisions] == ["computed", "shared", "computed", "shared"]
    else:
        assert all(d.layer is None and d.action.value == "computed" for d in decisions), decisions
        assert "numbers written in their names" in unknown_text, unknown_text


@pytest.mark.parametrize("kind, numbers, proven", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_compiled_blocks_numbered_by_name(kind, numbers, proven):
    model = kind(numbers).eval()
    backend = fic.IndexCacheEagerBackend(index_topk_pattern=PATTERN)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(inputs())
    (report,) = backend.reports
    _check(model, got, proven, report.decisions, " ".join(report.other_notes))


@pytest.mark.parametrize("numbers, proven", [([0, 1, 2, 3], True), ([1, 2, 3, 4], False)])
def test_exported_attribute_blocks_numbered_by_name(numbers, proven):
    """An export keeps only the state's names: an underscore-joined number is an attribute's, never a list's."""
    model = Attributes(numbers).eval()
    with torch.no_grad():
        program = torch.export.export(model, (inputs(),), strict=False)
        report = fic.apply_index_cache_to_exported_program(program, index_topk_freq=2, index_skip_topk_offset=1)
        got = program.module()(inputs())
    _check(model, got, proven, report.decisions, " ".join(report.other_notes))
