"""A one-program Triton kernel around ``_kth_key`` for ``topk_cases`` (a module of its own: a jit function
resolves its callees among its module's globals, and this one needs Triton at import)."""

import triton
import triton.language as tl

from fx_indexcache.fuse.kernels._topk_triton import _kth_key


@triton.jit
def kth_key_probe(keys_ptr, out_ptr, K, lo, hi, N: tl.constexpr):
    tl.store(out_ptr, _kth_key(tl.load(keys_ptr + tl.arange(0, N)), K, lo, hi))
