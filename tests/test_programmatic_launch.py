"""Programmatic dependent launch (``fuse/kernels/programmatic_launch.py``) without a GPU.

The contract that makes an early-scheduled kernel exact whatever ran before it on the stream: it waits for the grid
before it (``griddepcontrol.wait``) before its first access to global memory. Checked on the compiled code, not
the source: in the PTX of every CUDA top-k entry (NVRTC, sm_90) and of every logits kernel launched
programmatically (Triton, compiled for sm_90 here), the wait sits in the entry block, before any branch, label or
load, store or atomic that is not to shared, local, constant or parameter memory. Then the decision itself: the
switch, the refusals' reasons, and the driver structures a programmatic launch hands ``cuLaunchKernelEx``.
"""

import ctypes
import re

import pytest
import torch

from fx_indexcache.fuse.kernels import nvrtc, programmatic_launch, topk_cuda

WAIT = "griddepcontrol.wait"
#: an instruction that may touch global memory: a load, store, atomic, reduction, prefetch or async copy whose
#: state space is global or generic (no state space: the address may be global)
_MEMORY_OP = re.compile(r"^\s*(?:@!?%\w+\s+)?(ld|st|atom|red|prefetch|cp\.async|cp\.reduce\.async|multimem)\.(\S+)")
_NOT_GLOBAL = ("shared", "local", "const", "param")


def _entries(ptx: str) -> dict:
    """``{entry name: body}`` of a PTX module."""
    parts = re.split(r"^\.(?:visible\s+)?\.entry\s+(\w+)\(", ptx, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _before_the_wait(body: str) -> list:
    """What in ``body`` comes before its first wait and breaks the contract (a global or generic memory access,
    a branch, or a label some branch jumps to: a path that might skip the wait); ``["no wait"]`` when it has
    none."""
    head, found, _ = body.partition(WAIT)
    if not found:
        return ["no wait"]
    targets = set(re.findall(r"\bbra(?:\.uni)?\s+(\$?\w+)\s*;", body))
    bad = []
    for line in head.splitlines():
        op = _MEMORY_OP.match(line)
        label = re.match(r"^(\$?\w+):$", line.strip())
        if op and not op.group(2).startswith(_NOT_GLOBAL) or re.match(r"^\s*(?:@!?%\w+\s+)?bra\b", line) \
                or label and label.group(1) in targets:
            bad.append(line.strip())
    return bad


def test_the_check_finds_an_access_before_the_wait():
    """The check itself, on hand-written bodies: it is not vacuous."""
    assert _before_the_wait("mov.u32 %r1, 0;\nld.shared.u32 %r2, [%r1];\ngriddepcontrol.wait;\nld.global.u32 ...") == []
    assert _before_the_wait("ld.global.nc.v4.f32 {...}, [%rd1];\ngriddepcontrol.wait;") != []
    assert _before_the_wait("ld.u32 %r2, [%rd1];\ngriddepcontrol.wait;") != []  # generic: may be global
    assert _before_the_wait("@%p1 bra $L__BB0_2;\ngriddepcontrol.wait;") != []
    assert _before_the_wait("$L__BB0_1:\ngriddepcontrol.wait;\n@%p1 bra $L__BB0_1;") != []  # a loop around it
    assert _before_the_wait("$L__func_begin0:\ngriddepcontrol.wait;") == []  # a label no branch takes
    assert _before_the_wait("ld.global.u32 %r2, [%rd1];") == ["no wait"]


def test_every_cuda_topk_entry_waits_before_it_touches_global_memory():
    ptx = nvrtc.compile_ptx(topk_cuda.SOURCE.read_text(), "compute_90")
    entries = _entries(ptx)
    assert set(entries) == set(topk_cuda.KERNELS) | set(topk_cuda.CLUSTER_KERNELS)
    assert {name: _before_the_wait(body) for name, body in entries.items() if _before_the_wait(body)} == {}


def test_every_logits_kernel_launched_programmatically_waits_first(monkeypatch):
    """Each kind of logits launch compiled for sm_90 as a programmatic launch would run it (decode: at most
    ``DECODE_MAX_S`` queries): launched with the attribute (``launch_pdl``) and its PTX waiting first. With the
    launch refused, and for prefill (more queries), the launch is plain and has no wait."""
    pytest.importorskip("triton")
    from sm90_compile import compile_only_for_sm90

    from fx_indexcache.fuse.kernels import lightning_indexer as li

    S = li.DECODE_MAX_S
    launches = [(li.LogitsConfig("key_rows", 1, 128, 4, 2), 1), (li.LogitsConfig("decode", 1, 128, 4, 2), 1),
                (li.LogitsConfig("prefill", 16, 64, 8, 2), S), (li.LogitsConfig("key_rows", 16, 64, 4, 2, 2), S),
                (li.LogitsConfig("key_rows", 64, 64, 4, 2, 2), 8 * S)]
    H, D, T = 16, 64, 1024
    for allowed in (True, False):
        monkeypatch.setattr(li.programmatic_launch, "allowed", lambda device, on=allowed: on)
        with compile_only_for_sm90() as built:
            for cfg, queries in launches:
                q = torch.zeros(1, queries, H, D, dtype=torch.bfloat16)
                k, w = torch.zeros(1, T, D, dtype=torch.bfloat16), torch.zeros(1, queries, H, dtype=torch.bfloat16)
                li._launch(q, k, w, torch.empty(1, queries, T), True, 0.1, None, cfg)
        assert len(built) == len(launches)
        for (name, kernel), (cfg, queries) in zip(built, launches):
            ptx = kernel.asm["ptx"]
            programmatic = allowed and queries <= S
            assert bool(kernel.metadata.launch_pdl) == programmatic, (cfg, queries, allowed)
            if programmatic:
                assert _before_the_wait(ptx.split(".entry", 1)[1]) == [], (name, cfg)
            else:
                assert WAIT not in ptx, (name, cfg, queries)


def test_the_switch_and_the_refusals_name_their_reason(monkeypatch):
    assert "not a CUDA device" in programmatic_launch.reason_not(torch.device("cpu"))
    programmatic_launch._reason_not.cache_clear()
    monkeypatch.setenv("FX_INDEXCACHE_PDL", "off")
    try:
        assert programmatic_launch.reason_not(torch.device("cuda", 0)) == "off by FX_INDEXCACHE_PDL"
        programmatic_launch._reason_not.cache_clear()
        monkeypatch.setenv("FX_INDEXCACHE_PDL", "sometimes")
        with pytest.raises(ValueError, match=r"FX_INDEXCACHE_PDL='sometimes' is not allowed.*0, false, no, off"):
            programmatic_launch.reason_not(torch.device("cuda", 0))
        if not torch.cuda.is_available():  # the capability is asked only once the switch is on
            programmatic_launch._reason_not.cache_clear()
            monkeypatch.setenv("FX_INDEXCACHE_PDL", "1")
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
            assert "compute capability 8.0" in programmatic_launch.reason_not(torch.device("cuda", 0))
    finally:
        programmatic_launch._reason_not.cache_clear()


def test_the_launch_structures_are_the_drivers():
    """CUlaunchAttribute: an id padded to 8 bytes and a 64-byte value; CUlaunchConfig: seven unsigned ints, the
    stream at 32, the attributes at 40, their count at 48 (cuda.h, CUDA 12 and 13)."""
    assert ctypes.sizeof(nvrtc._LaunchAttribute) == 72
    assert nvrtc._LaunchAttribute.value.offset == 8
    assert (nvrtc._LaunchConfig.stream.offset, nvrtc._LaunchConfig.attrs.offset,
            nvrtc._LaunchConfig.num_attrs.offset, ctypes.sizeof(nvrtc._LaunchConfig)) == (32, 40, 48, 56)


def test_the_benchmark_turns_each_kernels_programmatic_launch_off_on_its_own():
    """``bench_topk_phases --sections programmatic_parts`` times the four plain/programmatic combinations of the
    logits kernel and the top-k: the switch it uses reaches the name each kernel module asks at launch, one module
    at a time, and puts it back."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_topk_phases as bench

    from fx_indexcache.fuse.kernels import lightning_indexer

    cpu = torch.device("cpu")
    for logits_on, topk_on in ((False, False), (False, True), (True, False), (True, True)):
        with bench._programmatic(logits_on, topk_on):
            for module, on in ((lightning_indexer, logits_on), (topk_cuda, topk_on)):
                assert (module.programmatic_launch is programmatic_launch) == on
                assert module.programmatic_launch.allowed(cpu) is False  # (never on a CPU device either way)
    assert lightning_indexer.programmatic_launch is programmatic_launch is topk_cuda.programmatic_launch
