"""Compile the fused score + top-k kernels for sm_90 on a machine without a GPU, and print each kernel's
registers and spills (``cuobjdump --dump-resource-usage`` of the cubin Triton built).

    PYTHONPATH=. python scripts/compile_fused_score_topk.py

A stand-in driver names the target (``GPUTarget("cuda", 90, 32)``) and every launch is turned into a warm-up
(compile only, nothing runs), so the launch plans of ``fused_score_topk._launch`` for the issue's shapes compile
exactly as on an H100 with this Triton -- the compile errors the CPU interpreter does not raise (globals that are
not constexpr, layouts, register pressure) show here. Every launch plan of the GPU tests' cases compiles too.
Run it under the GPU image's Triton as well (3.6: a scan layout it cannot lower once reached the H100 unseen)::

    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:. python scripts/compile_fused_score_topk.py

It leans on Triton's internals (``driver.set_active``, ``JITFunction.run``'s ``warmup``), so it may need
adjusting for another Triton; exit 1 on a compile failure or a kernel of the timed plans that spills.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "tests")))

H, D, TOPK = 64, 128, 2048
SHAPES = [(1, 1, 32768, False), (16, 1, 32768, True), (1, 1024, 32768, False), (1, 1024, 131072, True)]


class _TargetOnlyDriver:
    """The active driver, but naming an sm_90 target and device 0 (no GPU is touched)."""

    def __init__(self, real) -> None:
        self.real = real

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        return getattr(self.real, name)


def main() -> int:
    import triton.backends.nvidia as nv
    import triton.runtime.jit as jit
    from triton.runtime import driver

    try:
        real = driver.active
    except Exception:  # no CUDA driver here: the stand-in answers everything compilation asks
        real = None
    driver.set_active(_TargetOnlyDriver(real))
    built: list = []
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        built.append((self.__name__, kernel))
        return kernel

    jit.JITFunction.run = compile_only
    from fx_indexcache.fuse.kernels import fused_score_topk as fz

    for B, S, T, sorted_ in SHAPES:
        q = torch.zeros(B, S, H, D, dtype=torch.bfloat16)
        k = torch.zeros(B, T, D, dtype=torch.bfloat16)
        w = torch.zeros(B, S, H, dtype=torch.bfloat16)
        out = torch.empty(B, S, TOPK, dtype=torch.int32)
        cfg = fz.default_fused_config(B, S, T, H, D)
        print(f"{B}x{S}x{T} sorted={sorted_}: {cfg.name()}", flush=True)
        fz._launch(q, k, w, out, causal=True, scale=0.1, sorted=sorted_, config=cfg)
        masks = dict(kv_lens=torch.full((B,), T, dtype=torch.int32), bias=torch.zeros(S, T),
                     drop=torch.zeros(B, 1, T, dtype=torch.bool))
        fz._launch(q, k, w, out, causal=True, scale=0.1, sorted=sorted_, config=cfg, **masks)
    timed_plans = len(built)  # the plans above are the ones timed: a spill there fails the script
    # the launch plans the GPU tests run (tests/fused_score_topk_cases.py), each sorted and unsorted
    import fused_score_topk_cases as cases

    g = torch.Generator().manual_seed(0)
    for name, B, S, T, H_, D_, K, kind, causal, extra, launch, _ in cases.CASES:
        q, k, w = cases.integer_inputs(kind, B, S, T, H_, D_, g, dtype=torch.bfloat16)
        kv_lens, bias, drop = cases.masks_for(extra, B, S, T, g)
        print(f"case {name}", flush=True)
        for sorted_ in (False, True):
            out = torch.empty(B, S, min(K, T), dtype=torch.int32)
            fz._launch(q, k, w, out, causal=causal, scale=1.0, kv_lens=kv_lens, sorted=sorted_, bias=bias,
                       drop=drop, path=torch.empty(B * S, dtype=torch.int32), **launch)
    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    spills = 0
    for i, (name, kernel) in enumerate(built):
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        done = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
        os.unlink(f.name)
        usage = " ".join(line.strip() for line in done.stdout.splitlines() if "REG" in line)
        spills += i < timed_plans and "STACK:0 " not in usage
        print(f"  {name} ({kernel.metadata.num_warps} warps){'' if i < timed_plans else ' [test case]'}: {usage}")
    print("ok" if not spills else f"{spills} kernels spill")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
