"""Host side of the CUDA top-k (``topk_cuda.cu``, compiled at first use by ``nvrtc``).

Same plan as the Triton kernels (``topk.plan``: sample, rank, capacity; ``topk.split_plan``: how few rows
are cut), same output and tie rule; one launch a call (plus a zeroed count of finished splits for split
rows). Two block shapes: ``BLOCK`` threads (several blocks an SM; rows split over blocks when few) and, with
``wide``, ``WIDE`` threads, one block an SM (few rows), a row split over blocks only where the caller asks for
splits (``topk.split_plan``). ``available`` says whether this process can use it on a device, and why not.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from ...envvars import CUDA_TOPK, env_flag
from . import nvrtc, programmatic_launch
from .lightning_indexer import device_sms

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("topk_cuda.cu")
KERNELS = ("topk_vec", "topk_vec_sorted", "topk_any", "topk_any_sorted",
           "topk_wide_vec", "topk_wide_vec_sorted", "topk_wide_any", "topk_wide_any_sorted",
           "topk_wide_vec_binned", "topk_wide_vec_binned_sorted")
#: Compiled for sm_90 and later only (thread-block clusters): one row over the CLUSTER blocks of a cluster, each
#: filtering a segment into its shared memory, block 0 gathering the candidates through distributed shared memory.
CLUSTER_KERNELS = ("topk_cluster_vec", "topk_cluster_vec_sorted", "topk_cluster_any", "topk_cluster_any_sorted")
#: Threads a block (BLOCK and WIDE in the source), and blocks a cluster (CLUSTER).
BLOCK = 256
WIDE = 1024
CLUSTER = 8
#: A cluster block's segment is a multiple of this many keys (16-byte loads stay aligned).
CLUSTER_SEGMENT_ALIGN = 16


def min_cap(wide: bool) -> int:
    """The select reads its candidates four a thread a step: the capacity holds at least one step."""
    return 4 * (WIDE if wide else BLOCK)


def kernel_name(vec: bool, sorted: bool, wide: bool, cluster: bool = False, binned: bool = False) -> str:
    if binned:  # (wide, contiguous rows only)
        return "topk_wide_vec_binned" + ("_sorted" if sorted else "")
    shape = "cluster_" if cluster else "wide_" if wide else ""
    return "topk_" + shape + ("vec" if vec else "any") + ("_sorted" if sorted else "")


def has_clusters(device: int) -> bool:
    """Whether the device runs thread-block clusters (compute capability 9.0 or later)."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


def cluster_reason(device: torch.device) -> Optional[str]:
    """None where the cluster kernels run on ``device``; else why not (the first answer is kept for the process:
    the default asks on every long single row, and a failed build is not retried)."""
    return _cluster_reason(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cluster_reason(index: int) -> Optional[str]:
    why = _reason(index)
    if why is None and not has_clusters(index):
        why = f"compute capability {torch.cuda.get_device_capability(index)} has no thread-block clusters (9.0+)"
    if why is None:
        try:
            _cluster_kernels(index)
        except (nvrtc.CudaKernelUnavailable, OSError, RuntimeError) as e:
            why = f"the cluster kernels did not load: {e}"
    return why


class _Params(ctypes.Structure):
    """``struct Params`` of the source, field for field."""
    _fields_ = [(n, ctypes.c_void_p) for n in ("x", "out", "path", "reg_key", "reg_idx", "reg_tie", "counts", "done")]
    _fields_ += [(n, ctypes.c_longlong) for n in ("sxr", "sxt", "sor", "sok")]
    _fields_ += [(n, ctypes.c_int) for n in ("T", "K", "nb", "sb", "r_sample", "cap", "kp", "nsplit", "seg", "reg",
                                            "treg", "direct")]
    _fields_ += [("bins", ctypes.c_void_p)]


#: Binned rows (``row_bins``): a row's keys counted in ROW_BINS bins of key >> ROW_BIN_SHIFT (the source's).
ROW_BINS = 4096
ROW_BIN_SHIFT = 20


def ukeys(x: torch.Tensor) -> torch.Tensor:
    """The kernels' order-preserving key of fp32 scores (``ukey`` in the source: -0.0 as +0.0, the magnitude bits
    of negatives flipped, offset by 2^31), as int64 values in [0, 2^32)."""
    i = (x.float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(i < 0, (~i) & 0x7FFFFFFF, i | 0x80000000) & 0xFFFFFFFF


def row_bins(x2d: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, ROW_BINS]``: each row's keys (the kernels' order-preserving key of fp32 scores, -0.0 as +0.0)
    counted by ``key >> ROW_BIN_SHIFT`` (sign, exponent and three mantissa bits: eight bins an octave). A launch
    given them (``launch(bins=...)``) takes its threshold from them instead of sampling the row; a producer that
    writes the rows could count them as it stores them."""
    u = ukeys(x2d)
    rows = torch.arange(x2d.shape[0], device=x2d.device)[:, None] * ROW_BINS
    flat = (rows + (u >> ROW_BIN_SHIFT)).reshape(-1)
    return torch.bincount(flat, minlength=x2d.shape[0] * ROW_BINS).view(x2d.shape[0], ROW_BINS).to(torch.int32)


@functools.lru_cache(maxsize=None)
def _kernels(device: int):
    return nvrtc.load(str(SOURCE), KERNELS, device, _nvrtc_flags())


@functools.lru_cache(maxsize=None)
def _cluster_kernels(device: int):
    """The cluster kernels, loaded apart from the others: were they to fail, the rest of the CUDA top-k stays."""
    return nvrtc.load(str(SOURCE), CLUSTER_KERNELS, device, _nvrtc_flags())


def _nvrtc_flags() -> tuple[str, ...]:
    """FX_INDEXCACHE_NVRTC_FLAGS: extra NVRTC options (e.g. "-lineinfo" for compute-sanitizer's reports, or a
    build variant's -D macros)."""
    return tuple(os.environ.get("FX_INDEXCACHE_NVRTC_FLAGS", "").split())


#: Set to 0 / false / no / off to keep the top-k on the Triton kernels everywhere (read once a process, per device).
DISABLE_ENV = CUDA_TOPK


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None where the kernels load on ``device``; else why not (the first answer is kept for the process)."""
    return _reason(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _reason(device: int) -> Optional[str]:
    if not env_flag(DISABLE_ENV, default=True):
        return f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    try:
        _kernels(device)
        return None
    except (nvrtc.CudaKernelUnavailable, OSError, RuntimeError) as e:
        log.warning("CUDA top-k unavailable on cuda:%d (the Triton top-k is used): %s", device, e)
        return str(e)


def available(device: torch.device) -> bool:
    return unavailable_reason(device) is None


def smem_bytes(p: dict, nsplit: int, sorted: bool, wide: bool = False) -> int:
    """Dynamic shared memory of a launch: candidates (or the sample), the sort's pairs, the split offsets."""
    cap = max(p["CAP"], min_cap(wide))
    return max(cap * 8, p["NB"] * p["SB"] * 4) + (p["KP"] * 8 if sorted else 0) + ((nsplit + 1) * 8 if nsplit > 1 else 0)


def fits(device: int, p: dict, nsplit: int, sorted: bool, wide: bool = False, cluster: bool = False) -> bool:
    """Whether a launch's shared memory fits the device (large capacities and k may not)."""
    kernels = _cluster_kernels(device) if cluster else _kernels(device)
    limit = kernels[kernel_name(True, sorted, wide or cluster, cluster)].max_dynamic_smem
    return smem_bytes(p, nsplit, sorted, wide or cluster) <= limit


def cluster_split_plan(T: int) -> dict:
    """A cluster row's cut: ``CLUSTER`` segments of ``SEG`` keys (the last ones may be short or empty)."""
    seg = -(-T // (CLUSTER * CLUSTER_SEGMENT_ALIGN)) * CLUSTER_SEGMENT_ALIGN
    return dict(NSPLIT=CLUSTER, SEG=seg)


def launch(x2d: torch.Tensor, out2d: torch.Tensor, k: int, p: dict, sp: dict, sorted: bool,
           path: Optional[torch.Tensor], wide: bool = False, cluster: bool = False,
           bins: Optional[torch.Tensor] = None) -> None:
    """Top-k of the rows ``x2d [R, T]`` into ``out2d [R, k]`` (``p`` = ``topk.plan``, ``sp`` = ``topk.split_plan``;
    direct rows and rows of >= ``ONE_SPLIT_ROWS`` are one block a row; ``_launch`` hands ``wide`` launches one
    split unless asked for more). ``bins`` (``row_bins``; a wide launch of one block a contiguous sampled row):
    the threshold comes from them, not from a sample; counts that do not match the rows cost time, not exactness."""
    R, T = x2d.shape
    dev = x2d.device
    for name in ("NB", "SB"):  # the kernel places the sampled blocks by shifts
        if p[name] < 1 or p[name] & (p[name] - 1):
            raise ValueError(f"topk_cuda.launch: plan {name}={p[name]}, expected a power of two (topk.plan gives one)")
    if cluster and (p["DIRECT"] or sp["NSPLIT"] != CLUSTER):
        raise ValueError(f"topk_cuda.launch: a cluster launch needs a sampled plan cut in {CLUSTER} "
                         f"(cluster_split_plan), got DIRECT={p['DIRECT']}, NSPLIT={sp['NSPLIT']}")
    wide = wide or cluster
    nsplit = 1 if p["DIRECT"] else sp["NSPLIT"]
    seg = T if nsplit == 1 else sp["SEG"]
    cap = max(p["CAP"], min_cap(wide))
    # a cluster block keeps its candidates in its own shared memory: only the ties get global regions
    reg, treg = (0, k) if nsplit == 1 else (0 if cluster else min(seg, cap), min(seg, k))
    n_reg = R * nsplit
    # one int32 scratch: [tie regions | candidate keys | candidate indices | counts]; the done counts zeroed (split
    # rows outside a cluster: the last block to finish selects)
    counted = nsplit > 1 and not cluster
    scratch = torch.empty(n_reg * (treg + 2 * reg + (2 if counted else 0)), dtype=torch.int32, device=dev)
    base = scratch.data_ptr()
    done = torch.zeros(R if counted else 0, dtype=torch.int32, device=dev)
    vec = x2d.stride(1) == 1 and x2d.stride(0) % 4 == 0 and x2d.data_ptr() % 16 == 0
    if bins is not None:
        _check_bins(bins, R, dev, wide=wide and not cluster and nsplit == 1 and vec and not p["DIRECT"])
    prm = _Params(
        x=x2d.data_ptr(), out=out2d.data_ptr(), path=path.data_ptr() if path is not None else None,
        reg_key=base + 4 * n_reg * treg, reg_idx=base + 4 * n_reg * (treg + reg),
        reg_tie=base, counts=base + 4 * n_reg * (treg + 2 * reg) if counted else None,
        done=done.data_ptr() if counted else None,
        sxr=x2d.stride(0), sxt=x2d.stride(1), sor=out2d.stride(0), sok=out2d.stride(1),
        T=T, K=k, nb=p["NB"], sb=p["SB"], r_sample=p["R_SAMPLE"], cap=cap, kp=p["KP"], nsplit=nsplit, seg=seg,
        reg=reg, treg=treg, direct=int(p["DIRECT"]), bins=bins.data_ptr() if bins is not None else None)
    name = kernel_name(vec, sorted, wide, cluster, binned=bins is not None)
    kernel = (_cluster_kernels if cluster else _kernels)(dev.index)[name]
    # a programmatic launch (programmatic_launch) where the blocks are one wave at most (decode rows): there the
    # launch gap is a measurable part of the step; many-row (prefill) launches stay plain (not measured)
    programmatic = R * nsplit <= device_sms(dev) and programmatic_launch.allowed(dev)
    kernel.launch(R * nsplit, WIDE if wide else BLOCK, smem_bytes(p, nsplit, sorted, wide), prm,
                  torch.cuda.current_stream(dev).cuda_stream, programmatic=programmatic)


def _check_bins(bins: torch.Tensor, R: int, device: torch.device, wide: bool) -> None:
    """``launch``'s bins: for a launch that takes them (``wide``), as ``check_bins`` has them."""
    if not wide:
        raise ValueError("topk_cuda.launch: bins are taken by a wide launch of one block a contiguous (16-byte "
                         "aligned) sampled row only; this launch is split, a cluster's, strided or direct")
    check_bins(bins, R, device, "topk_cuda.launch")


def check_bins(bins: torch.Tensor, rows: int, device: torch.device, caller: str) -> None:
    """Binned counts as the kernels read and write them: int32 ``[rows, ROW_BINS]``, contiguous, on ``device``
    (``row_bins`` makes them; the key-rows logits kernel adds to them); else an error naming what was given."""
    if bins.dtype != torch.int32 or tuple(bins.shape) != (rows, ROW_BINS) or not bins.is_contiguous() \
            or bins.device != device:
        raise ValueError(f"{caller}: bins must be contiguous int32 [{rows}, {ROW_BINS}] on {device} (row_bins), "
                         f"got {bins.dtype} {list(bins.shape)} on {bins.device}")
