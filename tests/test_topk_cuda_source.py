"""The CUDA top-k on the CPU: its source compiles for the H200's sm_90 through NVRTC, as on users' machines (the
test extra installs libnvrtc; no GPU needed), with its errors' log and its disk cache, and through nvcc (on the CI
machine) within its register budget; the launch parameters the host fills match the kernel's struct; the switch
that keeps the top-k on Triton says so."""

import functools
import re
import shutil
import subprocess

import pytest

from fx_indexcache.fuse.kernels import topk_cuda

SOURCE = topk_cuda.SOURCE.read_text()


def test_host_parameters_match_the_kernel_struct():
    body = re.search(r"struct Params \{(.*?)\n\};", SOURCE, re.S).group(1)
    fields = []
    for decl in re.findall(r"^\s*([^/;]+);", body, re.M):  # "long long sxr, sxt, ..." or "const float *x"
        names = decl.split(",")
        fields += [re.sub(r"^.*[\s*]", "", names[0].strip())] + [n.strip() for n in names[1:]]
    assert fields == [name for name, _ in topk_cuda._Params._fields_]
    assert re.search(r"sizeof\(Params\) == (\d+)", SOURCE).group(1) == str(topk_cuda.ctypes.sizeof(topk_cuda._Params))


def test_launch_names_are_the_source_entry_points():
    assert sorted(topk_cuda.KERNELS) == sorted(re.findall(r"^(?:BINNED_)?ENTRY\((\w+),", SOURCE, re.M))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CI machine has CUDA 13's)")
def test_source_compiles_for_sm90_within_its_register_budget(tmp_path):
    src = tmp_path / "topk.cu"
    src.write_text(SOURCE)
    run = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-std=c++17", "-Xptxas", "-v", "-o", str(tmp_path / "t.cubin"),
                          str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    regs = dict(re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", run.stderr, re.S))
    assert sorted(regs) == sorted(topk_cuda.KERNELS + topk_cuda.CLUSTER_KERNELS)
    consts = {n: int(v) for n, v in re.findall(r"^#define (\w+) (\d+)", SOURCE, re.M)}
    assert (consts["BLOCK"], consts["WIDE"], consts["CLUSTER"]) == (topk_cuda.BLOCK, topk_cuda.WIDE, topk_cuda.CLUSTER)
    entries = re.findall(r"^ENTRY\((\w+), (\w+), (\w+),", SOURCE, re.M)
    entries += [(name, "WIDE", "1") for name in re.findall(r"^(?:CLUSTER|BINNED)_ENTRY\((\w+),", SOURCE, re.M)]
    assert sorted(name for name, _, _ in entries) == sorted(regs)
    for name, threads, blocks in entries:
        threads, blocks = (consts[v] if v in consts else int(v) for v in (threads, blocks))
        assert int(regs[name]) <= 65536 // (threads * blocks), (name, regs)  # its blocks an SM fit
    assert "spill" not in run.stderr or not re.search(r"[1-9]\d* bytes spill", run.stderr), run.stderr[-2000:]


def test_cluster_kernels_exist_only_where_clusters_do():
    """The cluster kernels compile for sm_90 (thread-block clusters) and are absent from an sm_80 build, whose
    other kernels still compile (the host loads CLUSTER_KERNELS only on 9.0+)."""
    nvrtc = _nvrtc_or_skip()
    hopper, ampere = _default_sm90_cubin(), nvrtc.compile_cubin(SOURCE, "sm_80")
    for name in topk_cuda.CLUSTER_KERNELS:
        assert name.encode() in hopper and name.encode() not in ampere
    assert all(name.encode() in ampere for name in topk_cuda.KERNELS)


def test_the_switch_keeps_the_top_k_on_triton_and_says_why(monkeypatch):
    monkeypatch.setenv(topk_cuda.DISABLE_ENV, "0")
    topk_cuda._reason.cache_clear()
    try:
        assert topk_cuda.unavailable_reason(topk_cuda.torch.device("cuda", 0)) == f"disabled by {topk_cuda.DISABLE_ENV}=0"
        assert not topk_cuda.available(topk_cuda.torch.device("cuda", 0))
    finally:
        topk_cuda._reason.cache_clear()


@functools.lru_cache(maxsize=None)
def _default_sm90_cubin() -> bytes:
    """The default build for sm_90, compiled once for the tests that compare against it or read it."""
    return _nvrtc_or_skip().compile_cubin(SOURCE, "sm_90")


def _nvrtc_or_skip():
    from fx_indexcache.fuse.kernels import nvrtc

    try:
        nvrtc.nvrtc_library()
    except nvrtc.CudaKernelUnavailable as e:  # the test extra installs it (nvidia-cuda-nvrtc-cu12) on Linux x86-64
        pytest.skip(f"no libnvrtc here: {e}")
    return nvrtc


def test_nvrtc_compiles_the_source_as_users_get_it():
    """The path users take (NVRTC, no toolkit), on the CPU: a cubin for sm_90 holding every kernel."""
    cubin = _default_sm90_cubin()
    assert cubin[:4] == b"\x7fELF" and all(name.encode() in cubin for name in topk_cuda.KERNELS)


def test_the_stamps_build_compiles_and_changes_the_code():
    """The phase-stamps build (bench_topk_phases.py, profiled with -lineinfo) compiles through NVRTC for sm_90 and
    its flag reaches the code: kernels' code differs from the default build's. (A flag the code ignores would leave
    every kernel's code equal: the count-row test shows that one build's sections match another's byte for byte.)"""
    nvrtc = _nvrtc_or_skip()
    default = _text_sections(_default_sm90_cubin())
    assert re.search(r"^#ifdef TOPK_STAMPS\b", SOURCE, re.M)
    cubin = nvrtc.compile_cubin(SOURCE, "sm_90", ("-DTOPK_STAMPS=1", "-lineinfo"))
    stamped = _text_sections(cubin)
    assert cubin[:4] == b"\x7fELF" and set(stamped) == set(default)
    assert any(stamped[name] != default[name] for name in default)


def _text_sections(cubin: bytes) -> dict:
    """``{section name: bytes}`` of a cubin's code sections (``.text.<kernel>``), from its ELF section headers."""
    import struct

    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names_at = struct.unpack_from("<HHH", cubin, 0x3A)

    def header(i):
        return struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize)

    names = header(names_at)[4]
    out = {}
    for i in range(count):
        name_at, _, _, _, offset, size, *_ = header(i)
        name = cubin[names + name_at: cubin.index(b"\0", names + name_at)].decode()
        if name.startswith(".text."):
            out[name] = cubin[offset: offset + size]
    return out


def test_the_count_row_build_changes_only_the_binned_entries():
    """-DTOPK_COUNT_ROW (the binned entries count their own row, for timing against the sample) reaches the binned
    entries' code and leaves every other kernel's code byte for byte as the default build's."""
    nvrtc = _nvrtc_or_skip()
    default = _text_sections(_default_sm90_cubin())
    counting = _text_sections(nvrtc.compile_cubin(SOURCE, "sm_90", ("-DTOPK_COUNT_ROW",)))
    assert set(default) == set(counting) and len(default) >= len(topk_cuda.KERNELS)
    changed = {name for name in default if default[name] != counting[name]}
    assert changed == {f".text.{name}" for name in topk_cuda.KERNELS if "binned" in name}


def test_nvrtc_errors_carry_the_compiler_log():
    nvrtc = _nvrtc_or_skip()
    with pytest.raises(nvrtc.CudaKernelUnavailable, match=r"sm_90 failed:[\s\S]*undefined_thing"):
        nvrtc.compile_cubin('extern "C" __global__ void k() { undefined_thing(); }', "sm_90")


def test_nvrtc_cubins_are_cached_on_disk_per_source_and_options(tmp_path, monkeypatch):
    nvrtc = _nvrtc_or_skip()
    monkeypatch.setenv("FX_INDEXCACHE_CACHE", str(tmp_path))
    src = 'extern "C" __global__ void k(int *p) { p[threadIdx.x] = 1; }'
    first = nvrtc.cached_cubin(src, "sm_90")
    assert len(list(tmp_path.rglob("*.cubin"))) == 1

    def no_compile(*a, **k):
        raise AssertionError("compiled again: the cache was not used")

    monkeypatch.setattr(nvrtc, "compile_cubin", no_compile)
    assert nvrtc.cached_cubin(src, "sm_90") == first
    with pytest.raises(AssertionError, match="compiled again"):  # other options: another entry
        nvrtc.cached_cubin(src, "sm_90", ("-lineinfo",))


def test_the_host_key_orders_scores_as_floats_do():
    """``ukeys`` (row_bins' key, the source's ukey): the order of the scores, both zeros one key, in [0, 2^32)."""
    import torch

    x = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 7.0, float("inf")])
    u = topk_cuda.ukeys(x)
    assert torch.equal(u.argsort(stable=True), x.argsort(stable=True))
    assert u[3] == u[4] == 2**31
    assert bool((u >= 0).all()) and bool((u < 2**32).all())


def test_row_bins_count_each_rows_keys_in_the_kernels_key_ranges():
    """The binned rows' counts (``row_bins``) use the kernel's bin constants and key: every key counted once in its
    row, both zeros in one bin, bins rising with the scores (the bin of the k-th largest key is where the kernel
    looks for it)."""
    import torch

    consts = {n: int(v) for n, v in re.findall(r"^#define (ROW_BINS|ROW_BIN_SHIFT) (\d+)", SOURCE, re.M)}
    assert consts == {"ROW_BINS": topk_cuda.ROW_BINS, "ROW_BIN_SHIFT": topk_cuda.ROW_BIN_SHIFT}
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1e-3], [1.0], [1e3]])
    x[0, :4] = torch.tensor([-0.0, 0.0, float("-inf"), float("inf")])
    bins = topk_cuda.row_bins(x)
    assert bins.dtype == torch.int32 and bins.shape == (3, topk_cuda.ROW_BINS)
    assert bins.sum(1).tolist() == [1000, 1000, 1000]
    zero = topk_cuda.row_bins(torch.tensor([[0.0, -0.0]]))
    assert int(zero.max()) == 2  # one bin for both zeros
    for r in range(3):
        values = x[r].sort().values
        b = [int(topk_cuda.row_bins(v.view(1, 1)).argmax()) for v in values[::37]]
        assert b == sorted(b), r
        kth = values[-200]  # the 200th largest lies in the bin where the counts from the top reach 200
        from_top = bins[r].flip(0).cumsum(0)
        assert topk_cuda.ROW_BINS - 1 - int((from_top < 200).sum()) == int(topk_cuda.row_bins(kth.view(1, 1)).argmax())


def test_bins_are_refused_where_the_launch_would_not_read_them():
    """Bins go to a wide launch of one block a contiguous sampled row, as int32 [R, ROW_BINS]: anything else is an
    error naming what was given, before a launch (checked here without a GPU)."""
    import torch

    from fx_indexcache.fuse.kernels import topk as tk

    x, out = torch.randn(2, 4096), torch.empty(2, 64, dtype=torch.int32)
    bins = topk_cuda.row_bins(x)
    with pytest.raises(ValueError, match="algorithm='cuda_wide' only, got algorithm='split'"):
        tk._launch(x, out, 64, algorithm="split", bins=bins)
    dev = torch.device("cpu")
    with pytest.raises(ValueError, match="wide launch of one block a contiguous"):
        topk_cuda._check_bins(bins, 2, dev, wide=False)
    with pytest.raises(ValueError, match=r"int32 \[2, 4096\].*got torch.int64 \[2, 4096\]"):
        topk_cuda._check_bins(bins.long(), 2, dev, wide=True)
    with pytest.raises(ValueError, match=r"got torch.int32 \[1, 4096\]"):
        topk_cuda._check_bins(bins[:1], 2, dev, wide=True)
    topk_cuda._check_bins(bins, 2, dev, wide=True)  # (what the launch takes)
