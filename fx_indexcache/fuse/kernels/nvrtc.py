"""CUDA C++ kernels compiled at first use by NVRTC and launched through the driver API.

Why not a C++ extension: it needs the CUDA toolkit and a build step on the user's machine. NVRTC ships
with every CUDA build of PyTorch (the ``nvidia`` runtime wheels), and so does the driver: a kernel's
source travels as package data, is compiled once per GPU architecture (the cubin is cached on disk under
``$FX_INDEXCACHE_CACHE`` or ``~/.cache/fx_indexcache``) and launched on the caller's current stream, so it
is captured by CUDA graphs like any other kernel. Anything missing (no NVRTC, no driver entry point, a
compile error) raises ``CudaKernelUnavailable`` with the reason; callers fall back to their Triton kernels.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

#: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_MAX_DYNAMIC_SHARED = 8
#: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (programmatic_launch.py says what it buys)
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value union (here its first int)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig: grid, block, dynamic shared memory, stream, attributes."""
    _fields_ = [(n, ctypes.c_uint) for n in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "smem")]
    _fields_ += [("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


class CudaKernelUnavailable(RuntimeError):
    """NVRTC or the driver could not provide a kernel here (the message says why)."""


def _load_first(names: Sequence[str]) -> ctypes.CDLL:
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(f"{name}: {e}")
    raise CudaKernelUnavailable("; ".join(errors) or "no candidates")


@functools.lru_cache(maxsize=None)
def nvrtc_library(path: Optional[str] = None) -> ctypes.CDLL:
    """libnvrtc: ``path`` if given, else the one PyTorch's CUDA build ships (by soname, then in the
    ``nvidia`` wheels' folders)."""
    if path:
        return _load_first([path])
    major = (torch.version.cuda or "").split(".")[0]
    names = [f"libnvrtc.so.{major}"] if major else []
    names.append("libnvrtc.so")
    for site in sys.path:
        names += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
        names += sorted(glob.glob(os.path.join(site, "nvidia", "*", "*", "lib", "libnvrtc.so*")))
    return _load_first(names)


@functools.lru_cache(maxsize=None)
def _driver() -> ctypes.CDLL:
    lib = _load_first(["libcuda.so.1", "libcuda.so"])
    vp, i, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
    lib.cuLaunchKernel.argtypes = [vp, u, u, u, u, u, u, u, vp, ctypes.POINTER(vp), ctypes.POINTER(vp)]
    if hasattr(lib, "cuLaunchKernelEx"):  # CUDA 12.0 on; programmatic_launch refuses older drivers
        lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), vp, ctypes.POINTER(vp), ctypes.POINTER(vp)]
    lib.cuFuncSetAttribute.argtypes = [vp, i, i]
    lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(vp), vp, ctypes.c_char_p]
    lib.cuModuleLoadData.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p]
    return lib


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise CudaKernelUnavailable(f"{what}: CUDA driver error {result} ({(name.value or b'?').decode()})")


def compile_cubin(source: str, arch: str, options: Sequence[str] = (), *, library: Optional[str] = None) -> bytes:
    """The cubin of ``source`` for ``arch`` (e.g. "sm_90"); needs no GPU. Raises with NVRTC's log on error."""
    return _compile(source, arch, options, library, "CUBIN")


def compile_ptx(source: str, arch: str, options: Sequence[str] = ()) -> str:
    """The PTX of ``source`` for the virtual ``arch`` (e.g. "compute_90"): what a check of the kernels' instruction
    order reads (``tests/test_programmatic_launch.py``); needs no GPU."""
    return _compile(source, arch, options, None, "PTX").rstrip(b"\0").decode()


def _compile(source: str, arch: str, options: Sequence[str], library: Optional[str], output: str) -> bytes:
    lib = nvrtc_library(library)
    prog = ctypes.c_void_p()

    def check(rc: int, what: str) -> None:
        if rc != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise CudaKernelUnavailable(f"NVRTC {what}: {lib.nvrtcGetErrorString(rc).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None), "create")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", *(o.encode() for o in options)]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if rc != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise CudaKernelUnavailable(f"NVRTC compile for {arch} failed:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        check(getattr(lib, f"nvrtcGet{output}Size")(prog, ctypes.byref(size)), f"{output.lower()} size")
        data = ctypes.create_string_buffer(size.value)
        check(getattr(lib, f"nvrtcGet{output}")(prog, data), output.lower())
        return data.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _cache_dir() -> Path:
    return Path(os.environ.get("FX_INDEXCACHE_CACHE") or Path.home() / ".cache" / "fx_indexcache") / "nvrtc"


def cached_cubin(source: str, arch: str, options: Sequence[str] = ()) -> bytes:
    """``compile_cubin``, once per source, architecture, options and NVRTC version (kept on disk)."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc_library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    key = hashlib.sha256("\0".join([source, arch, *options, f"{major.value}.{minor.value}"]).encode()).hexdigest()
    path = _cache_dir() / f"{key[:32]}.cubin"
    if path.exists():
        return path.read_bytes()
    cubin = compile_cubin(source, arch, options)
    try:  # a cache that cannot be written only costs the next process a compile
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        tmp.replace(path)
    except OSError:
        pass
    return cubin


class Kernel:
    """One ``extern "C"`` kernel of a loaded module; ``launch`` passes a ctypes structure by value."""

    def __init__(self, module: ctypes.c_void_p, name: str, block_smem: int):
        """``block_smem``: the device's shared memory a block may have; static and dynamic share it."""
        self.name = name
        self.func = ctypes.c_void_p()
        _check(_driver().cuModuleGetFunction(ctypes.byref(self.func), module, name.encode()), f"kernel {name}")
        self.max_dynamic_smem = block_smem - self.attributes()["static_smem"]
        if self.max_dynamic_smem > 48 * 1024:
            _check(_driver().cuFuncSetAttribute(self.func, _MAX_DYNAMIC_SHARED, self.max_dynamic_smem),
                   f"{name}: dynamic shared memory {self.max_dynamic_smem}")

    def attributes(self) -> dict:
        """What the compiler gave the kernel: registers a thread, local (spill) bytes, static shared bytes."""
        out = {}
        for key, attr in (("regs", 4), ("local_bytes", 3), ("static_smem", 1)):  # CU_FUNC_ATTRIBUTE_*
            v = ctypes.c_int()
            _check(_driver().cuFuncGetAttribute(ctypes.byref(v), attr, self.func), f"{self.name} attribute")
            out[key] = v.value
        return out

    def launch(self, grid: int, block: int, smem: int, params: ctypes.Structure, stream: int,
               programmatic: bool = False) -> None:
        """``programmatic``: a programmatic dependent launch (``programmatic_launch``); the kernel must wait
        for the grid before it (``griddepcontrol.wait``) before its first access to global memory."""
        if smem > self.max_dynamic_smem:
            raise ValueError(f"{self.name}: smem={smem} bytes, at most {self.max_dynamic_smem} on this device")
        args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(params), ctypes.c_void_p))
        if not programmatic:
            _check(_driver().cuLaunchKernel(self.func, grid, 1, 1, block, 1, 1, smem, ctypes.c_void_p(stream), args,
                                            None), f"launch {self.name}")
            return
        attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        config = _LaunchConfig(grid_x=grid, grid_y=1, grid_z=1, block_x=block, block_y=1, block_z=1, smem=smem,
                               stream=stream, attrs=ctypes.pointer(attr), num_attrs=1)
        _check(_driver().cuLaunchKernelEx(ctypes.byref(config), self.func, args, None),
               f"programmatic launch {self.name}")


def _make_context_current(device: int) -> None:
    """The device's primary context current on this thread: the one PyTorch's allocations and streams use,
    so the module's kernels may take its tensors and streams."""
    torch.empty(1, device=f"cuda:{device}")  # the runtime makes the primary context current
    ctx = ctypes.c_void_p()
    _check(_driver().cuCtxGetCurrent(ctypes.byref(ctx)), "current context")
    if not ctx.value:
        raise CudaKernelUnavailable(f"no current CUDA context for device {device}")


@functools.lru_cache(maxsize=None)
def load(source_path: str, names: tuple, device: int, options: tuple = ()) -> dict:
    """``{name: Kernel}`` for the ``extern "C"`` kernels ``names`` of the source file, on ``device`` (cached:
    one compile per architecture, one module per device)."""
    torch.cuda.init()
    major, minor = torch.cuda.get_device_capability(device)
    cubin = cached_cubin(Path(source_path).read_text(), f"sm_{major}{minor}", options)
    module = ctypes.c_void_p()
    with torch.cuda.device(device):
        _make_context_current(device)
        _check(_driver().cuModuleLoadData(ctypes.byref(module), cubin), "load module")
    smem = int(getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 48 * 1024))
    return {name: Kernel(module, name, smem) for name in names}
