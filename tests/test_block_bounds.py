"""Block bounds (``fuse/kernels/block_bounds.py``): the summary the key-rows logits kernel leaves for the decode top-k's
threshold. What a threshold from them must obey (at least k keys reach it, whatever the row), the plan's rule, the
kernel's bounds under Triton's interpreter, and the errors that name a wrong bounds argument. The top-k that reads
them runs on the card only (tests/gpu/test_topk_and_cudagraphs_gpu.py, ``-k bounded``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fx_indexcache.fuse.kernels import block_bounds
from fx_indexcache.fuse.kernels import lightning_indexer as li

HERE = Path(__file__).resolve().parent


def _row(kind: str, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, T, generator=g)
    if kind == "ties":
        x = torch.randint(-3, 3, (1, T), generator=g).float()
    elif kind == "crowded":  # the largest keys all in the row's last tenth
        x[:, -(T // 10):] += 20.0
    elif kind == "masked_tail":
        x[:, T // 2:] = float("-inf")
    return x


@settings(max_examples=60, deadline=None)
@given(T=st.integers(64, 9000), k=st.sampled_from([1, 16, 100, 512, 2048]), block_t=st.sampled_from([16, 64, 128]),
       key_blocks=st.sampled_from([1, 2, 4]), kind=st.sampled_from(["randn", "ties", "crowded", "masked_tail"]),
       seed=st.integers(0, 2**16))
def test_a_bounds_threshold_keeps_at_least_k_keys_of_any_row(T, k, block_t, key_blocks, kind, seed):
    """Each block has at least ``rank`` keys at or above its floor and its top is its largest key; the threshold the
    top-k takes (the m-th largest floor) is reached by at least k keys of the row whenever it is finite; and the
    plan's m blocks of ``rank`` cover k."""
    k = min(k, T)
    p = block_bounds.plan(T, k, block_t, key_blocks)
    assume(p is not None)  # (plans refused: test_the_plan_refuses_rows_its_bounds_cannot_steer)
    m = p.threshold_blocks(k)
    assert m * p.rank >= k and m <= p.blocks and p.rank <= p.groups // 2
    x = _row(kind, T, seed)
    bounds = block_bounds.reference(x, p)
    blocks = torch.full((1, p.blocks * p.span), float("-inf"))
    blocks[:, :T] = x
    blocks = blocks.view(p.blocks, p.span)
    assert torch.equal(bounds[0, :, 1], blocks.amax(dim=1))
    assert bool(((blocks >= bounds[0, :, 0:1]).sum(dim=1) >= p.rank).all())
    thr = block_bounds.threshold(bounds, p, k)
    if torch.isfinite(thr).all():
        assert int((x >= thr[:, None]).sum()) >= k


def test_the_plan_refuses_rows_its_bounds_cannot_steer():
    """Too many blocks for one top-k block's threads, or a rank above half the classes (a short row, a large k):
    None, and the top-k samples as before."""
    assert block_bounds.plan(32768, 2048, 128, 1) == block_bounds.BoundsPlan(256, 128, 64, 9)
    assert block_bounds.plan(32768, 2048, 128, 2).rank == 18
    assert block_bounds.plan(262144, 2048, 128, 1) is None  # 2048 blocks
    assert block_bounds.plan(4096, 2048, 128, 1) is None  # 32 blocks: a rank of 72
    assert block_bounds.plan(131072, 2048, 128, 1).blocks == block_bounds.MAX_BLOCKS


def test_the_logits_kernels_bounds_are_its_rows_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    done = subprocess.run([sys.executable, str(HERE / "logits_bounds_cases.py")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "ok 20 cases" in done.stdout, done.stdout


def _inputs(T=64):
    return torch.randn(1, 1, 4, 32).half(), torch.randn(1, T, 32).half(), torch.randn(1, 1, 4)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_kernels_that_do_not_write_bounds_refuse_them(kind):
    q, k, w = _inputs()
    p = block_bounds.BoundsPlan(4, 16, 8, 2)
    with pytest.raises(ValueError, match=r"bounds are written by kind 'key_rows' launches only, got LogitsConfig.kind="):
        li._launch(q, k, w, torch.empty(1, 1, 64), True, 1.0, None, li.LogitsConfig(kind, 1, 16, 4, 1),
                   bounds=(block_bounds.empty(1, p, "cpu"), p))


def test_a_plan_that_is_not_the_launchs_is_refused_with_both_shapes():
    q, k, w = _inputs()
    p = block_bounds.BoundsPlan(2, 32, 8, 2)  # the launch has 4 programs of 16 keys
    with pytest.raises(ValueError, match=r"is not this launch's \(4 programs of 16 x 1 keys\)"):
        li._launch(q, k, w, torch.empty(1, 1, 64), True, 1.0, None, li.LogitsConfig("key_rows", 1, 16, 4, 1),
                   bounds=(block_bounds.empty(1, p, "cpu"), p))


def test_bounds_of_the_wrong_shape_or_dtype_are_named():
    p = block_bounds.BoundsPlan(4, 16, 8, 2)
    with pytest.raises(ValueError, match=r"caller: bounds must be contiguous float32 \[3, 4, 2\] on cpu .* got "
                                         r"torch.float16 \[3, 4, 2\]"):
        block_bounds.check(torch.zeros(3, 4, 2, dtype=torch.float16), 3, p, "cpu", "caller")
    with pytest.raises(ValueError, match=r"got torch.float32 \[3, 5, 2\]"):
        block_bounds.check(torch.zeros(3, 5, 2), 3, p, "cpu", "caller")


def test_no_bounds_where_the_top_k_does_not_run_one_block_a_row():
    """``decode_bounds`` asks for bounds only where the top-k after the launch reads them: never for rows our
    kernels do not take (here: CPU rows), a torch top-k, or a launch that does not write them."""
    x = torch.empty(1, 1, 32768)
    key_rows = li.LogitsConfig("key_rows", 1, 128, 4, 1)
    assert li.decode_bounds(x, key_rows, 2048, False) is None
    assert li.decode_bounds(x, key_rows, 2048, False, method="torch") is None
    assert li.decode_bounds(x, li.LogitsConfig("decode", 1, 128, 4, 1), 2048, False) is None
