"""The CUDA top-k on the CPU: its source compiles for the H200's sm_90 (where nvcc is installed, as on the CI
machine) within its register budget, the launch parameters the host fills match the kernel's struct, and the
switch that keeps the top-k on Triton says so."""

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
    assert sorted(topk_cuda.KERNELS) == sorted(re.findall(r'extern "C" __global__ void __launch_bounds__\([^)]*\) (\w+)',
                                                          SOURCE))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CI machine has CUDA 13's)")
def test_source_compiles_for_sm90_within_its_register_budget(tmp_path):
    src = tmp_path / "topk.cu"
    src.write_text(SOURCE)
    run = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-std=c++17", "-Xptxas", "-v", "-o", str(tmp_path / "t.cubin"),
                          str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    regs = dict(re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", run.stderr, re.S))
    assert sorted(regs) == sorted(topk_cuda.KERNELS)
    block, min_blocks = (int(re.search(rf"#define {n} (\d+)", SOURCE).group(1)) for n in ("BLOCK", "MIN_BLOCKS"))
    assert block == topk_cuda.BLOCK
    assert all(int(r) <= 65536 // (block * min_blocks) for r in regs.values()), regs  # MIN_BLOCKS blocks an SM fit


def test_the_switch_keeps_the_top_k_on_triton_and_says_why(monkeypatch):
    monkeypatch.setenv(topk_cuda.DISABLE_ENV, "0")
    topk_cuda._reason.cache_clear()
    try:
        assert topk_cuda.unavailable_reason(topk_cuda.torch.device("cuda", 0)) == f"disabled by {topk_cuda.DISABLE_ENV}=0"
        assert not topk_cuda.available(topk_cuda.torch.device("cuda", 0))
    finally:
        topk_cuda._reason.cache_clear()
