"""Row-wise top-k of fp32 logits (Triton): exact threshold selection, two algorithms.

"bitsearch" (rows up to ``MAX_ROW`` = 32K): one program owns one row and keeps it in registers as order-preserving int32 keys (a float's bits,
with the magnitude bits of negatives flipped, compare like the floats; -0.0 is mapped to +0.0). It finds the k-th largest key
bit by bit from the top, counting at each step how many keys reach the candidate (32 counting passes
over registers, no re-reads), then writes the indices: every key above the threshold in index order,
then the lowest-indexed keys equal to it until k are written. So ties at the threshold go to the lowest
indices, and ``-inf`` (masked) keys, which can only be selected as threshold ties, come after every
finite one. The result is unsorted unless ``sorted=True`` (then a stable descending sort by value
follows, in torch).

"radix" (any row length): one program per row streams the row from memory in chunks, four times, each
time histogramming the next 8 bits of the keys inside the bucket found so far (``tl.histogram``), then a
fifth time to write the indices with the same order and tie rule as "bitsearch".

Non-CUDA tensors (and, for "bitsearch", rows over ``MAX_ROW``) are left to ``torch.topk`` by the caller.
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

    @triton.jit
    def _radix_topk_kernel(
        x_ptr, idx_ptr, T, K,
        sxr, sxt, sir, sik,
        CHUNK: tl.constexpr,
        HIST_MASK: tl.constexpr,
    ):
        NB: tl.constexpr = 256 if HIST_MASK else 512
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * sxr
        bins = tl.arange(0, NB)
        prefix = tl.zeros([], dtype=tl.uint32)  # key bits decided so far (the top 8*p bits)
        k_rem = K + tl.zeros([], dtype=tl.int32)  # rank still to find inside the current bucket
        n_chunks = tl.cdiv(T, CHUNK)
        for p in tl.static_range(4):
            SHIFT = 24 - 8 * p  # compile-time (p comes from static_range)
            hist = tl.zeros([NB], dtype=tl.int32)
            for c in range(0, n_chunks):
                co = c * CHUNK + tl.arange(0, CHUNK)
                ok = co < T
                xv = tl.load(x_row + co * sxt, mask=ok, other=0.0)
                xv = tl.where(xv == 0.0, 0.0, xv)  # -0.0 -> +0.0
                bits = xv.to(tl.int32, bitcast=True)
                # order-preserving unsigned key: flip all bits of negatives, only the sign bit of the rest
                u = (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)
                digit = ((u >> SHIFT) & 0xFF).to(tl.int32)
                if p == 0:
                    inwin = ok
                else:
                    inwin = ok & ((u >> (SHIFT + 8)) == prefix)
                if HIST_MASK:
                    hist += tl.histogram(digit, NB, mask=inwin)
                else:
                    hist += tl.histogram(tl.where(inwin, digit, 256), NB)
            h = tl.where(bins < 256, hist, 0)
            ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # ge[d] = keys in the bucket with digit >= d
            d_star = tl.max(tl.where((ge >= k_rem) & (bins < 256), bins, -1), axis=0)
            above = tl.sum(tl.where((bins > d_star) & (bins < 256), h, 0), axis=0)
            k_rem = k_rem - above
            prefix = (prefix << 8) | d_star.to(tl.uint32)
        thr = prefix
        n_gt = K - k_rem

        base_gt = tl.zeros([], dtype=tl.int32)
        base_eq = tl.zeros([], dtype=tl.int32)
        o_row = idx_ptr + row * sir
        for c in range(0, n_chunks):
            co = c * CHUNK + tl.arange(0, CHUNK)
            ok = co < T
            xv = tl.load(x_row + co * sxt, mask=ok, other=0.0)
            xv = tl.where(xv == 0.0, 0.0, xv)  # -0.0 -> +0.0
            bits = xv.to(tl.int32, bitcast=True)
            # order-preserving unsigned key: flip all bits of negatives, only the sign bit of the rest
            u = (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)
            gt = ok & (u > thr)
            eq = ok & (u == thr)
            packed = gt.to(tl.int32) + (eq.to(tl.int32) << 16)  # CHUNK < 65536: two counters in one scan
            cs = tl.cumsum(packed, axis=0)
            pos_gt = base_gt + (cs & 0xFFFF) - 1
            pos_eq = base_eq + (cs >> 16) - 1
            take_eq = eq & (pos_eq < k_rem)
            dest = tl.where(gt, pos_gt, n_gt + pos_eq)
            tl.store(o_row + dest.to(tl.int64) * sik, co, mask=gt | take_eq)
            tot = tl.sum(packed, axis=0)
            base_gt += tot & 0xFFFF
            base_eq += tot >> 16

    import inspect

    try:
        hist_mask = "mask" in inspect.signature(tl.histogram).parameters
    except Exception:  # pragma: no cover
        hist_mask = False
    return {"row_topk": _row_topk_kernel, "radix_topk": _radix_topk_kernel, "hist_mask": hist_mask}


def supported(logits: torch.Tensor, k: int, algo: str = "bitsearch") -> bool:
    """Whether ``row_topk`` takes this input (CUDA fp32, 1 <= k <= row length; "bitsearch": rows <= MAX_ROW)."""
    if not (isinstance(logits, torch.Tensor) and logits.is_cuda and logits.dtype == torch.float32):
        return False
    if logits.dim() < 1 or logits.numel() == 0:
        return False
    T = logits.shape[-1]
    if not (1 <= k <= T < 2**31 - 1):
        return False
    if algo == "bitsearch" and T > MAX_ROW:
        return False
    return _kernels() is not None


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


def _launch_radix(x2d: torch.Tensor, out2d: torch.Tensor, k: int, num_warps: int = 8, chunk: int = 4096,
                  hist_mask: Optional[bool] = None):
    R, T = x2d.shape
    kern = _kernels()
    if hist_mask is None:
        hist_mask = kern["hist_mask"]
    chunk = max(256, min(chunk, 1 << (max(T, 1) - 1).bit_length()))
    return kern["radix_topk"][(R,)](
        x2d, out2d, T, k,
        x2d.stride(0), x2d.stride(1), out2d.stride(0), out2d.stride(1),
        CHUNK=chunk, HIST_MASK=bool(hist_mask), num_warps=num_warps,
    )


def row_topk(logits: torch.Tensor, k: int, *, sorted: bool = False, algo: str = "bitsearch",
             num_warps: Optional[int] = None) -> torch.Tensor:
    """int32 indices ``[..., k]`` of the k largest entries of each row (see module doc for order and ties)."""
    if algo not in ("bitsearch", "radix"):
        raise ValueError(f"unknown algo {algo!r}")
    if not supported(logits, k, algo):
        raise ValueError(f"row_topk({algo}): needs a CUDA fp32 tensor with 1 <= k <= row length"
                         + (f" <= {MAX_ROW}" if algo == "bitsearch" else ""))
    lead = logits.shape[:-1]
    T = logits.shape[-1]
    x2d = logits.reshape(-1, T)
    out = torch.empty((x2d.shape[0], k), dtype=torch.int32, device=logits.device)
    if x2d.shape[0]:
        with torch.cuda.device(logits.device):
            if algo == "bitsearch":
                _launch(x2d, out, k, num_warps)
            else:
                _launch_radix(x2d, out, k, num_warps or 8)
    if sorted:
        vals = torch.gather(x2d, 1, out.long())
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices
        out = torch.gather(out, 1, order)
    return out.reshape(*lead, k)
