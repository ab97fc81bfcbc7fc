"""Compiling Triton kernels for an H100 (sm_90) on a machine without a GPU.

``compile_only_for_sm90()`` swaps in a driver that names the target (``GPUTarget("cuda", 90, 32)``) and turns every
launch of a ``triton.jit`` kernel into a warm-up: the kernel compiles exactly as on the card with this Triton
(PTX, cubin, registers) and nothing runs. Inside the block, launch our kernels as usual with CPU tensors; the
compiled kernels are appended, with their names, to the list it yields. It leans on Triton's internals
(``driver.set_active``, ``JITFunction.run``'s ``warmup``), so another Triton may need it adjusted.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile

import torch


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


@contextlib.contextmanager
def compile_only_for_sm90():
    """Yields a list that collects ``(kernel name, compiled kernel)`` for each launch inside the block."""
    import triton.runtime.jit as jit
    from triton.runtime import driver

    try:
        real = driver.active
    except Exception:  # no CUDA driver here: the stand-in answers everything compilation asks
        real = None
    built: list = []
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        built.append((self.__name__, kernel))
        return kernel

    driver.set_active(_TargetOnlyDriver(real))
    jit.JITFunction.run = compile_only
    try:
        yield built
    finally:
        jit.JITFunction.run = run
        driver._active = real  # None: the next use looks for a driver again, as before the block


def resource_usage(kernel) -> str:
    """``cuobjdump --dump-resource-usage`` of a compiled kernel's cubin, its REG/STACK/SHARED line."""
    import triton.backends.nvidia as nv

    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        done = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    return " ".join(line.strip() for line in done.stdout.splitlines() if "REG" in line)
