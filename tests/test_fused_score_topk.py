"""``kernels.fused_score_topk`` (score + top-k in one pass) on the CPU.

The kernels run under Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set before Triton is
imported): ``tests/fused_score_topk_cases.py`` builds integer-valued q, k and weights (exact fp32 scores, so
ties are real ties), forces capacities and samples small enough that every path runs -- direct, candidates,
threshold ties, the masked tail, the fallback inline and in its pool -- in the prefill and decode layouts and
with the select in the scoring kernel's last program, and checks every row's set (tie rule: lowest indices)
and sorted order against the reference scores. Here also: the op's fake shape, its CPU reference, and the
refusals, each naming what it refuses.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fx_indexcache.fuse.kernels import fused_score_topk as fz

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("filter_", fz.FILTERS)
def test_every_path_under_the_interpreter(filter_):
    """Every path, exact integer scores, both scoring layouts, with either way of placing kept keys."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]),
               FUSED_TOPK_FILTER=filter_)
    done = subprocess.run([sys.executable, str(HERE / "fused_score_topk_cases.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ok [0, 1, 2, 3, 4]" in done.stdout and f"filter {filter_}" in done.stdout


def _inputs(B=2, S=3, T=40, H=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g).half(), torch.randn(B, T, D, generator=g).half(),
            torch.rand(B, S, H, generator=g))


def test_the_op_off_cuda_is_the_reference_and_its_fake_has_the_index_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, w = _inputs()
    bias = torch.randn(3, 40)
    drop = torch.rand(2, 1, 40) < 0.2
    got = torch.ops.fx_indexcache.indexer_topk_fused(q, k, w, 7, True, 0.5, None, True, bias, drop)
    x = fz.masked_reference_scores(q, k, w, causal=True, scale=0.5, bias=bias, drop=drop)
    assert got.dtype == torch.int32 and got.shape == (2, 3, 7)
    assert torch.equal(torch.gather(x, -1, got.long()), torch.topk(x, 7, dim=-1).values)
    with FakeTensorMode() as mode:
        fq, fk, fw = (mode.from_tensor(t) for t in (q, k, w))
        fake = torch.ops.fx_indexcache.indexer_topk_fused(fq, fk, fw, 100, False, 1.0, None, False, None, None)
    assert fake.shape == (2, 3, 40) and fake.dtype == torch.int32  # min(topk, T) columns


@pytest.mark.parametrize("change, expect", [
    (dict(topk=0), "topk=0: must be an int >= 1"),
    (dict(topk=fz.MAX_K + 1, T=fz.MAX_K + 8), f"takes k <= {fz.MAX_K}"),
    (dict(bias=torch.zeros(3, 41)), "bias of shape (3, 41) does not broadcast to [B, S, T] = [2, 3, 40]"),
    (dict(bias=torch.zeros(3, 40, dtype=torch.int32)), "bias must be a floating tensor (got torch.int32)"),
    (dict(drop=torch.zeros(3, 40)), "drop must be a bool tensor (got torch.float32)"),
])
def test_bad_inputs_are_refused_naming_the_field(change, expect):
    q, k, w = _inputs(T=change.pop("T", 40))
    args = dict(topk=8, bias=None, drop=None) | change
    why = fz._shape_reason(q, k, args["topk"], args["bias"], args["drop"])
    assert why is not None and expect in why, why


def test_off_cuda_the_kernel_entry_point_refuses_with_the_reason():
    q, k, w = _inputs()
    assert "CUDA" in fz.fused_unsupported_reason(q, k, w, 8)
    with pytest.raises(ValueError, match="indexer_topk_fused: unsupported inputs: inputs must all be on one CUDA"):
        fz.indexer_topk_fused(q, k, w, 8)


def test_a_filter_the_kernel_does_not_have_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"FusedTopkConfig.filter='prefix': allowed scan, atomic"):
        fz.FusedTopkConfig("prefill", filter="prefix")
    assert fz.FusedTopkConfig("prefill", filter="atomic").name().endswith("-atomic")


def test_the_default_launch_of_each_filter():
    """The scan filter's prefill tiles stay at 64 keys (its registers); the atomic filter's take the logits kernel's
    keys; decode keeps the logits kernel's tiles; another filter is refused naming the argument."""
    scan = fz.default_fused_config(1, 1024, 32768, 64, 128, filter="scan")
    atomic = fz.default_fused_config(1, 1024, 32768, 64, 128, filter="atomic")
    assert fz.default_fused_config(1, 1024, 32768, 64, 128).filter == fz.FusedTopkConfig().filter == fz.DEFAULT_FILTER
    assert (scan.filter, scan.block_s, scan.block_t) == ("scan", 64, 64)
    assert (atomic.filter, atomic.block_s, atomic.block_t, atomic.num_warps) == ("atomic", 64, 256, 8)
    decode = [fz.default_fused_config(1, 1, 32768, 64, 128, filter=f) for f in fz.FILTERS]
    assert {dataclasses.replace(d, filter="scan") for d in decode} == {decode[0]}
    with pytest.raises(ValueError, match=r"default_fused_config: filter='prefix': allowed scan, atomic"):
        fz.default_fused_config(1, 1024, 32768, 64, 128, filter="prefix")


def test_every_field_of_a_launch_shows_in_its_name():
    """Records and benchmark rows name a launch by ``name()``: two launches that differ in any field have two names
    (the pipeline depth was once missing, and three sweeps of it read as one launch timed three times)."""
    base = fz.FusedTopkConfig("prefill")
    names = {base.name()}
    for field in dataclasses.fields(base):
        other = {"kind": "decode", "filter": next(f for f in fz.FILTERS if f != base.filter)}.get(field.name)
        if other is None:
            other = getattr(base, field.name) * 2
        names.add(dataclasses.replace(base, **{field.name: other}).name())
    assert len(names) == 1 + len(dataclasses.fields(base))
