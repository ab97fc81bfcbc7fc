"""Row-wise top-k of fp32 logits by an exact bitwise threshold search (Triton), for rows up to 32K long.

One program owns one row and keeps it in registers as order-preserving int32 keys (a float's bits,
with the magnitude bits of negatives flipped, compare like the floats; -0.0 is mapped to +0.0). It finds the k-th largest key
bit by bit from the top, counting at each step how many keys reach the candidate (32 counting passes
over registers, no re-reads), then writes the indices: every key above the threshold in index order,
then the lowest-indexed keys equal to it until k are written. So ties at the threshold go to the lowest
indices, and ``-inf`` (masked) keys, which can only be selected as threshold ties, come after every
finite one. The result is unsorted unless ``sorted=True`` (then a stable descending sort by value
follows, in torch).

Rows longer than ``MAX_ROW`` (or non-CUDA tensors) are left to ``torch.topk`` by the caller. (A chunked
8-bit radix variant built on ``tl.histogram``, which takes any row length, measured 1.3-1.5x slower than
torch.topk on an H100 and was dropped: see docs/notes/indexer_kernel.md.)
"""

import functools
from typing import Optional

import torch

MAX_ROW = 32768


@functools.lru_cache(maxsize=None)
def _kernels():
    try:
        import triton
        import triton.language as tl
    except Exception:  # pragma: no cover
        return None

    @triton.jit
    def _row_topk_kernel(
        x_ptr, idx_ptr, T, K,
        sxr, sxt, sir, sik,
        BLOCK: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * sxr
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_row + offs * sxt, mask=offs < T, other=0.0)
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = tl.where(x == 0.0, 0, key)  # -0.0 ties with +0.0, as the floats do
        # lanes past the row end get the smallest int32, below every real key (-inf included)
        key = tl.where(offs < T, key, -2147483648)

        # k-th largest key: sign bit, then bits 30..0
        n_nonneg = tl.sum((key >= 0).to(tl.int32), axis=0)
        thr = tl.where(n_nonneg >= K, 0, -2147483648)
        for i in range(31):
            cand = thr + (1 << (30 - i))
            cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
            thr = tl.where(cnt >= K, cand, thr)

        n_gt = tl.sum((key > thr).to(tl.int32), axis=0)
        need_eq = K - n_gt

        # write: keys above thr in index order, then the first need_eq keys equal to thr (re-read in chunks)
        base_gt = n_gt * 0
        base_eq = n_gt * 0
        o_row = idx_ptr + row * sir
        for c in range(0, tl.cdiv(T, CHUNK)):
            co = c * CHUNK + tl.arange(0, CHUNK)
            ok = co < T
            xc = tl.load(x_row + co * sxt, mask=ok, other=0.0)
            bc = xc.to(tl.int32, bitcast=True)
            kc = tl.where(bc < 0, bc ^ 0x7FFFFFFF, bc)
            kc = tl.where(xc == 0.0, 0, kc)
            gt = ok & (kc > thr)
            eq = ok & (kc == thr)
            gt_i = gt.to(tl.int32)
            eq_i = eq.to(tl.int32)
            pos_gt = base_gt + tl.cumsum(gt_i, axis=0) - 1
            pos_eq = base_eq + tl.cumsum(eq_i, axis=0) - 1
            take_eq = eq & (pos_eq < need_eq)
            dest = tl.where(gt, pos_gt, n_gt + pos_eq)
            tl.store(o_row + dest.to(tl.int64) * sik, co, mask=gt | take_eq)
            base_gt += tl.sum(gt_i, axis=0)
            base_eq += tl.sum(eq_i, axis=0)

    return {"row_topk": _row_topk_kernel}


def supported(logits: torch.Tensor, k: int) -> bool:
    """Whether ``row_topk`` takes this input (CUDA fp32, rows of at most MAX_ROW, 1 <= k <= row length)."""
    if not (isinstance(logits, torch.Tensor) and logits.is_cuda and logits.dtype == torch.float32):
        return False
    if logits.dim() < 1 or logits.numel() == 0:
        return False
    T = logits.shape[-1]
    return 1 <= k <= T <= MAX_ROW and _kernels() is not None


def _launch(x2d: torch.Tensor, out2d: torch.Tensor, k: int, num_warps: Optional[int] = None):
    R, T = x2d.shape
    block = max(16, 1 << (T - 1).bit_length())
    if num_warps is None:
        num_warps = 4 if block <= 4096 else (8 if block <= 8192 else 16)
    chunk = min(block, 4096)
    return _kernels()["row_topk"][(R,)](
        x2d, out2d, T, k,
        x2d.stride(0), x2d.stride(1), out2d.stride(0), out2d.stride(1),
        BLOCK=block, CHUNK=chunk, num_warps=num_warps,
    )


def row_topk(logits: torch.Tensor, k: int, *, sorted: bool = False, num_warps: Optional[int] = None) -> torch.Tensor:
    """int32 indices ``[..., k]`` of the k largest entries of each row (see module doc for order and ties)."""
    if not supported(logits, k):
        raise ValueError("row_topk: needs a CUDA fp32 tensor with 1 <= k <= row length <= %d" % MAX_ROW)
    lead = logits.shape[:-1]
    T = logits.shape[-1]
    x2d = logits.reshape(-1, T)
    out = torch.empty((x2d.shape[0], k), dtype=torch.int32, device=logits.device)
    if x2d.shape[0]:
        with torch.cuda.device(logits.device):
            _launch(x2d, out, k, num_warps)
    if sorted:
        vals = torch.gather(x2d, 1, out.long())
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices
        out = torch.gather(out, 1, order)
    return out.reshape(*lead, k)
