"""Opt-in fp8 indexer scoring (``indexer_precision="fp8"``), as the serving engines run DeepSeek-V3.2.

The exact path (``lightning_indexer.indexer_logits``) multiplies bf16 q and k. This one first quantises

* each key ``k[b, t, :]`` to float8 e4m3 with one scale per token, and
* each query head ``q[b, s, h, :]`` with one scale per (token, head), folded into the head weight,

then multiplies the e4m3 values on fp8 tensor cores with fp32 accumulation (the fused kernel's
``KSCALE`` variant), applies ReLU, the weighted head sum, and the key's scale::

    logit[b, s, t] = k_scale[b, t] * sum_h (w[b, s, h] * q_scale[b, s, h] * scale) * relu(q8[b, s, h] . k8[b, t])

which equals ``sum_h w * relu(scale * dq(q) . dq(k))`` because the scales are positive. The scale of a
row is ``amax / 448`` (448: e4m3's largest finite value) rounded *up* to a power of two -- the "ue8m0"
scale format of V3.2's own inference code. Power-of-two scales make quantising (``x * 2^-e``) and
dequantising exact, so the only rounding is e4m3's own (3 mantissa bits, round to nearest even), and
the Triton quantiser and the torch one here give the same bytes. ``amax`` is floored at
``AMAX_FLOOR`` so an all-zero row gets a finite scale.

Where the fp8 kernel cannot run (no CUDA, compute capability < 8.9, head dim < 32) the custom op
``fx_indexcache::indexer_logits_fp8`` computes the same math in torch: quantise with
``torch.float8_e4m3fn``, dequantise, fp32 matmul (``indexer_logits_fp8_reference``). The graph pass
substitutes this op only where the fused kernel is chosen; see ``kernel_substitution``.

Hopper's fp8 MMA adds the products of one instruction chain (K = the head dim, 128 in V3.2) with
reduced internal precision before the fp32 accumulator (Triton's default on sm90, and what DeepGEMM's
per-128 promotion amounts to at this K); the GPU tests bound the difference to the torch reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from . import lightning_indexer as li

__all__ = [
    "AMAX_FLOOR",
    "E4M3_MAX",
    "Fp8Operands",
    "fp8_unsupported_reason",
    "indexer_logits_fp8",
    "indexer_logits_fp8_reference",
    "logits_from_fp8",
    "quantize_operands",
    "quantize_rows",
    "quantize_rows_reference",
]

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
_EXP_MASK, _MANT_MASK = 0xFF, 0x7FFFFF


# ----------------------------------------------------------------------------------------------
# Per-row quantisation
# ----------------------------------------------------------------------------------------------


def _pow2_ceil_bits(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For positive normal fp32 ``v``: (2^ceil(log2 v), its exact reciprocal), from the IEEE bits."""
    bits = v.view(torch.int32)
    exponent = ((bits >> 23) & _EXP_MASK) + ((bits & _MANT_MASK) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32), ((254 - exponent) << 23).view(torch.float32)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as e4m3 with one power-of-two fp32 scale per last-dim row: ``(x8, scale)``, ``x ~ x8 * scale``."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    scale, inverse = _pow2_ceil_bits((amax * (1.0 / E4M3_MAX)).contiguous())
    x8 = (xf * inverse.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, scale


@functools.lru_cache(maxsize=None)
def _quant_kernel():
    """The Triton per-row quantiser (same bits as ``quantize_rows_reference``); None without Triton."""
    if li._triton() is None:
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def _quantize_rows_kernel(x_ptr, y_ptr, s_ptr, R, sxr, sxd, D: tl.constexpr, BLOCK_R: tl.constexpr):
        rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rd = tl.arange(0, D)
        ok = rr < R
        r64 = rr.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * sxr + rd[None, :] * sxd, mask=ok[:, None], other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
        bits = (amax * (1.0 / 448.0)).to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (exponent << 23).to(tl.float32, bitcast=True)
        inverse = ((254 - exponent) << 23).to(tl.float32, bitcast=True)
        y = tl.minimum(tl.maximum(x * inverse[:, None], -448.0), 448.0).to(tl.float8e4nv)
        tl.store(y_ptr + r64[:, None] * D + rd[None, :], y, mask=ok[:, None])
        tl.store(s_ptr + r64, scale, mask=ok)

    return _quantize_rows_kernel


def _triton_quantizes(x: torch.Tensor) -> bool:
    d = x.shape[-1]
    return x.is_cuda and x.dim() >= 1 and d >= 16 and (d & (d - 1)) == 0 and _quant_kernel() is not None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows_reference`` in one Triton pass on CUDA (same bytes), in torch elsewhere."""
    if not _triton_quantizes(x):
        return quantize_rows_reference(x)
    d = x.shape[-1]
    rows = x.reshape(-1, d)  # a view for the layouts the graph hands over; a copy otherwise
    y = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        block_r = 32
        with torch.cuda.device(x.device):
            _quant_kernel()[(li.triton_cdiv(rows.shape[0], block_r),)](
                rows, y, s, rows.shape[0], rows.stride(0), rows.stride(1), D=d, BLOCK_R=block_r, num_warps=4)
    return y.view(x.shape), s.view(x.shape[:-1])


# ----------------------------------------------------------------------------------------------
# Operands and logits
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fp8Operands:
    """What the fp8 kernel reads: e4m3 q ``[B,S,H,D]`` and k ``[B,T,D]``, fp32 k scales ``[B,T]``, and the
    fp32 head weights ``[B,S,H]`` with the q scales and the score scale folded in (an engine's fp8
    key cache holds ``k8`` and ``k_scale``)."""

    q8: torch.Tensor
    k8: torch.Tensor
    k_scale: torch.Tensor
    weights: torch.Tensor


def quantize_operands(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float = 1.0) -> Fp8Operands:
    """Quantise q per (token, head) and k per token; fold q's scales and ``scale`` (>= 0) into the weights."""
    q8, q_scale = quantize_rows(q)
    k8, k_scale = quantize_rows(k)
    folded = (weights.float() * q_scale * float(scale)).contiguous()
    return Fp8Operands(q8, k8, k_scale.contiguous(), folded)


def fp8_unsupported_reason(q, k, weights, kv_lens=None, *, scale: float = 1.0) -> Optional[str]:
    """Why the fp8 kernel cannot take these (real or fake) bf16/fp16 inputs, or None when it can."""
    why = li.unsupported_reason(q, k, weights, kv_lens, scale=scale)
    if why is not None:
        return why
    try:
        if int(q.shape[3]) < 32:
            return f"head dim {int(q.shape[3])} is below 32 (the fp8 MMA's K step)"
        if torch.cuda.get_device_capability(q.device) < (8, 9):
            return "fp8 tensor cores need compute capability >= 8.9"
    except Exception as e:  # pragma: no cover - defensive: never let the predicate raise
        return f"check failed: {type(e).__name__}: {e}"
    return None


def logits_from_fp8(
    ops: Fp8Operands,
    *,
    causal: bool = True,
    kv_lens: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    config: Optional[li.LogitsConfig] = None,
) -> torch.Tensor:
    """fp32 logits ``[B, S, T]`` from already quantised operands through the fp8 kernel (CUDA, no checks
    beyond shapes: ``indexer_logits_fp8`` checks; the benchmark times this alone, as with an fp8 cache)."""
    return li.launch_into(ops.q8, ops.k8, ops.weights, out, causal, 1.0, kv_lens, config, k_scale=ops.k_scale)


def indexer_logits_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    causal: bool = True,
    scale: float = 1.0,
    kv_lens: Optional[torch.Tensor] = None,
    config: Optional[li.LogitsConfig] = None,
) -> torch.Tensor:
    """fp8-scored logits ``[B, S, T]`` (module doc) through the Triton kernels; inputs as ``indexer_logits``."""
    why = fp8_unsupported_reason(q, k, weights, kv_lens, scale=scale)
    if why is not None:
        raise ValueError(f"indexer_logits_fp8: unsupported inputs: {why}")
    if kv_lens is not None and kv_lens.shape[0] != q.shape[0]:
        raise ValueError("kv_lens must have one entry per batch row")
    return logits_from_fp8(quantize_operands(q, k, weights, scale), causal=causal, kv_lens=kv_lens, config=config)


def indexer_logits_fp8_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    *,
    causal: bool = True,
    scale: float = 1.0,
    kv_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The same fp8 math in torch: quantise (``quantize_rows_reference``), dequantise, fp32 logits."""
    q8, q_scale = quantize_rows_reference(q)
    k8, k_scale = quantize_rows_reference(k)
    q_dq = q8.float() * q_scale.unsqueeze(-1)
    k_dq = k8.float() * k_scale.unsqueeze(-1)
    return li.indexer_logits_reference(q_dq, k_dq, weights, causal=causal, scale=scale, kv_lens=kv_lens)


def _logits_fp8_any(q, k, weights, causal, scale, kv_lens):
    if fp8_unsupported_reason(q, k, weights, kv_lens, scale=scale) is None:
        return indexer_logits_fp8(q, k, weights, causal=causal, scale=scale, kv_lens=kv_lens)
    return indexer_logits_fp8_reference(q, k, weights, causal=causal, scale=scale, kv_lens=kv_lens)


#: ``torch.ops.fx_indexcache.indexer_logits_fp8``, the op the pass inserts for fp8 scoring.
li.define_logits_op("indexer_logits_fp8", _logits_fp8_any)
