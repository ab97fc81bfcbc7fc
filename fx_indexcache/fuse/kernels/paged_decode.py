"""Indexer logits for decode over a paged key cache, in bf16/fp16 or fp8 (the serving engines' layout).

Engines keep the indexer's keys in pages of ``PAGE`` tokens (vLLM and SGLang: 64) that a block table maps per
request, so one request's keys are not contiguous. This kernel reads them where they lie::

    k_pages      [P, PAGE, D]    bf16/fp16, or float8 e4m3 with ``k_scale [P, PAGE]`` (one scale per token)
    block_table  [B, N]          int32/int64: request b's token t lives in page block_table[b, t // PAGE],
                                 row t % PAGE
    kv_lens      [B]             tokens of request b (at most N * PAGE)
    q [B, S, H, D], weights [B, S, H]: as ``lightning_indexer`` (fp8: q in e4m3, its per-(token, head) scale
                                 and ``scale`` already folded into the weights, ``indexer_fp8.quantize_operands``)
    logit[b, s, t] = sum_h w[b, s, h] * relu(<q[b, s, h], k[b, t]>)   (times k_scale of token t in fp8)

for ``t < kv_lens[b]`` and ``t <= s + kv_lens[b] - S`` (the S queries are the request's last tokens: decode, or
a few speculative tokens); ``-inf`` elsewhere, up to ``N * PAGE`` columns. Pages past a request's length are never
read, so their block-table entries may hold anything.

Each program owns one query and ``KEY_BLOCKS`` blocks of ``BLOCK_T`` keys (pages gathered row by row; ``BLOCK_T``
need not divide the page), reads the query's q and weights once and loops over its blocks (the next block's keys
load while this one computes), each block's product one tile on the matrix unit: the query's heads on its M side
(config kind "decode", as the contiguous decode kernel) or the block's keys (kind "key_rows", as the contiguous
key-rows kernel: the head sum stays within a thread and its quad instead of crossing warps). Keys a query does
not see are never read; programs entirely past it store ``-inf`` without loading anything. No host
synchronisation: safe under CUDA-graph capture. ``paged_decode_logits_reference`` gathers the pages and computes
the same math in torch.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import lightning_indexer as li
from .lightning_indexer import LogitsConfig

__all__ = ["PAGED_KINDS", "RULE_CONFIGS", "paged_config", "paged_config_reason", "paged_decode_logits",
           "paged_decode_logits_reference", "paged_unsupported_reason"]

_KEY_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)


@functools.lru_cache(maxsize=None)
def _kernel():
    try:
        import triton
        import triton.language as tl
    except Exception:  # pragma: no cover - depends on the machine
        return None

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, w_ptr, o_ptr, bt_ptr, kvlen_ptr, ks_ptr,
        S, N, H,
        sqb, sqs, sqh, sqd,
        skp, skr, skd,
        swb, sws, swh,
        sob, sos, sot,
        sbtb, sbtn,
        sksp, sksr,
        PAGE: tl.constexpr,
        KSCALE: tl.constexpr,
        D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_T: tl.constexpr,
        KEY_BLOCKS: tl.constexpr,
        KEY_ROWS: tl.constexpr,
    ):
        t_first = tl.program_id(0) * (KEY_BLOCKS * BLOCK_T)
        s = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rd = tl.arange(0, D)
        rh = tl.arange(0, BLOCK_H)
        width = N * PAGE
        kv_len = tl.minimum(tl.maximum(tl.load(kvlen_ptr + b).to(tl.int32), 0), width)
        last = s + kv_len - S  # the last key this query sees
        s64 = s.to(tl.int64)
        if t_first > last:
            for j in range(KEY_BLOCKS):
                rt = t_first + j * BLOCK_T + tl.arange(0, BLOCK_T)
                tl.store(o_ptr + b * sob + s64 * sos + rt.to(tl.int64) * sot,
                         tl.full([BLOCK_T], float("-inf"), tl.float32), mask=rt < width)
        else:
            h_ok = rh < H
            qs = tl.load(q_ptr + b * sqb + s64 * sqs + rh[:, None] * sqh + rd[None, :] * sqd, mask=h_ok[:, None],
                         other=0.0)
            ws = tl.load(w_ptr + b * swb + s64 * sws + rh * swh, mask=h_ok, other=0.0).to(tl.float32)
            for j in range(KEY_BLOCKS):
                rt = t_first + j * BLOCK_T + tl.arange(0, BLOCK_T)
                visible = (rt < kv_len) & (rt <= last)  # only visible keys' pages are read
                page = tl.load(bt_ptr + b * sbtb + (rt // PAGE).to(tl.int64) * sbtn, mask=visible,
                               other=0).to(tl.int64)
                row = (rt % PAGE).to(tl.int64)
                kt = tl.load(k_ptr + page[:, None] * skp + row[:, None] * skr + rd[None, :] * skd,
                             mask=visible[:, None], other=0.0)
                if KEY_ROWS:  # keys on the M side: a key's heads sum within a thread's registers and its quad
                    d = tl.dot(kt, tl.trans(qs))
                    logit = tl.sum(tl.maximum(d, 0.0) * ws[None, :], axis=1)
                else:  # heads on the M side: the head sum crosses warps
                    d = tl.dot(qs, tl.trans(kt))
                    logit = tl.sum(tl.maximum(d, 0.0) * ws[:, None], axis=0)
                if KSCALE:
                    logit = logit * tl.load(ks_ptr + page * sksp + row * sksr, mask=visible, other=0.0)
                tl.store(o_ptr + b * sob + s64 * sos + rt.to(tl.int64) * sot, tl.where(visible, logit, float("-inf")),
                         mask=rt < width)

    return _paged_decode_kernel


def paged_unsupported_reason(q, k_pages, weights, block_table, kv_lens, k_scale=None) -> Optional[str]:
    """Why ``paged_decode_logits`` cannot take these inputs (the field, its value, what is allowed), or None."""
    if q.dim() != 4 or weights.dim() != 3 or k_pages.dim() != 3:
        return (f"q must be [B, S, H, D], weights [B, S, H], k_pages [P, PAGE, D]; got q {tuple(q.shape)}, "
                f"weights {tuple(weights.shape)}, k_pages {tuple(k_pages.shape)}")
    B, S, H, D = q.shape
    if k_pages.dtype not in _KEY_DTYPES or q.dtype != k_pages.dtype:
        return f"q and k_pages must share one of {_KEY_DTYPES}; got q {q.dtype}, k_pages {k_pages.dtype}"
    if (k_pages.dtype == torch.float8_e4m3fn) != (k_scale is not None):
        return "k_scale [P, PAGE] is given exactly when k_pages is float8_e4m3fn"
    if k_scale is not None and tuple(k_scale.shape) != tuple(k_pages.shape[:2]):
        return f"k_scale must be [P, PAGE] = {tuple(k_pages.shape[:2])}; got {tuple(k_scale.shape)}"
    if k_pages.shape[2] != D or D < 16 or D & (D - 1):
        return f"head dim D={D} must be a power of two >= 16 and k_pages' last dim (got {k_pages.shape[2]})"
    if tuple(weights.shape) != (B, S, H):
        return f"weights must be [B, S, H] = {(B, S, H)}; got {tuple(weights.shape)}"
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype not in (torch.int32, torch.int64):
        return f"block_table must be int32/int64 [B={B}, pages]; got {block_table.dtype} {tuple(block_table.shape)}"
    if kv_lens.dim() != 1 or kv_lens.shape[0] != B or kv_lens.dtype not in (torch.int32, torch.int64):
        return f"kv_lens must be int32/int64 [B={B}]; got {kv_lens.dtype} {tuple(kv_lens.shape)}"
    devices = {t.device for t in (q, k_pages, weights, block_table, kv_lens, *([] if k_scale is None else [k_scale]))}
    if len(devices) != 1:
        return f"all inputs must be on one device; got {sorted(map(str, devices))}"
    if _kernel() is None:
        return "Triton is not importable"
    return None


#: The launch where no card measurement applies (``paged_config``), by precision; fewer key blocks a program on short
#: rows (``fill_the_card``). On an H100 (benchmarks/sweep_logits_configs.py, B1 / B16 / B64 x 32K and B4 x 128K):
#: fp8 takes the key-rows launch (64-key blocks, eight a program, 4 warps, 2 stages), the fastest of 48 launches at
#: all four shapes and 1.22-1.29x faster than the heads-on-M launch below (6e8d707); bf16 keeps that launch (128-key
#: blocks, eight a program, 4 warps, 2 stages: within 6 % of the fastest of 32; key-rows launches not swept in bf16).
RULE_CONFIGS = {
    "fp8": LogitsConfig("key_rows", block_s=1, block_t=64, num_warps=4, num_stages=2, key_blocks=8),
    "bf16": LogitsConfig("decode", block_s=1, block_t=128, num_warps=4, num_stages=2, key_blocks=8),
}


def paged_config(B: int, S: int, width: int, H: int, D: int, precision: str,
                 device: Optional[torch.device] = None) -> LogitsConfig:
    """The launch ``paged_decode_logits`` uses when none is given: the card's measured one for the nearest paged
    shape (``lightning_indexer.measured_config``, kind "paged", which ``benchmarks/sweep_logits_configs.py``
    writes), else the precision's ``RULE_CONFIGS`` entry; either with fewer key blocks a program where short rows
    would leave SMs idle (``fill_the_card``)."""
    if precision not in RULE_CONFIGS:
        raise ValueError(f"paged_config: precision={precision!r}, expected one of {sorted(RULE_CONFIGS)}")
    measured = li.measured_config(precision, B, S, width, H, D, device, kind="paged")
    if measured is not None:
        return measured
    return li.fill_the_card(RULE_CONFIGS[precision], B * S, width, li.device_sms(device))


#: The ``LogitsConfig`` kinds the paged kernel takes: "decode" puts a query's heads on the matrix unit's M side,
#: "key_rows" its keys (as the contiguous kernels of those names do).
PAGED_KINDS = ("decode", "key_rows")


def paged_config_reason(config) -> Optional[str]:
    """Why the paged kernel cannot launch ``config`` (its kind, one query a program, a power-of-two block), or None."""
    if (not isinstance(config, LogitsConfig) or config.kind not in PAGED_KINDS or config.block_s != 1
            or config.queries_per_dot != 1):
        return (f"config must be a LogitsConfig of kind 'decode' or 'key_rows' with block_s=1 and queries_per_dot=1 "
                f"(one query a program); got {config!r}")
    if config.block_t & (config.block_t - 1):
        return f"config.block_t={config.block_t} must be a power of two"
    return None


def paged_decode_logits(q, k_pages, weights, block_table, kv_lens, *, k_scale=None, out=None,
                        config: Optional[LogitsConfig] = None) -> torch.Tensor:
    """fp32 logits ``[B, S, N * PAGE]`` over the paged key cache (module doc). ``weights`` must already hold
    ``scale`` (and, for fp8, the queries' scales). Runs the Triton kernel (CUDA, or the CPU interpreter) with
    ``config`` (``block_t`` keys a block, ``key_blocks`` blocks a program, warps and stages), by default
    ``paged_config``'s."""
    why = paged_unsupported_reason(q, k_pages, weights, block_table, kv_lens, k_scale)
    if why is None and config is not None:
        why = paged_config_reason(config)
    if why is not None:
        raise ValueError(f"paged_decode_logits: {why}")
    B, S, H, D = q.shape
    page, pages = k_pages.shape[1], block_table.shape[1]
    width = pages * page
    if out is None:
        out = torch.empty((B, S, width), dtype=torch.float32, device=q.device)
    elif tuple(out.shape) != (B, S, width) or out.dtype != torch.float32:
        raise ValueError(f"paged_decode_logits: out must be fp32 [{B}, {S}, {width}]; got {out.dtype} "
                         f"{tuple(out.shape)}")
    if B == 0 or S == 0 or width == 0:
        return out
    if config is None:
        precision = "fp8" if k_pages.dtype == torch.float8_e4m3fn else "bf16"
        config = paged_config(B, S, width, H, D, precision, q.device)
    ks = k_scale if k_scale is not None else out
    grid = (-(-width // (config.block_t * config.key_blocks)), S, B)
    _kernel()[grid](
        q, k_pages, weights, out, block_table, kv_lens, ks,
        S, pages, H,
        *q.stride(), *k_pages.stride(), *weights.stride(), *out.stride(), *block_table.stride(),
        *(k_scale.stride() if k_scale is not None else (0, 0)),
        PAGE=page, KSCALE=k_scale is not None, D=D, BLOCK_H=li.head_tile(H),
        BLOCK_T=config.block_t, KEY_BLOCKS=config.key_blocks, KEY_ROWS=config.kind == "key_rows",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def paged_decode_logits_reference(q, k_pages, weights, block_table, kv_lens, *, k_scale=None) -> torch.Tensor:
    """The same logits in torch: gather each request's pages into contiguous keys (dequantised for fp8)."""
    B, S = q.shape[:2]
    page, pages = k_pages.shape[1], block_table.shape[1]
    width = pages * page
    keys = k_pages.float() if k_scale is None else k_pages.float() * k_scale.unsqueeze(-1)
    t = torch.arange(width, device=q.device)
    lens = kv_lens.long().clamp(0, width)
    live = t.view(1, -1) < lens.view(-1, 1)  # [B, width]
    page_of = torch.where(live, block_table.long().gather(1, (t // page).expand(B, -1)), 0)
    k = keys[page_of, (t % page).expand(B, -1)]  # [B, width, D]
    scores = torch.relu(torch.einsum("bshd,btd->bsht", q.float(), k))
    logits = (scores * weights.float().unsqueeze(-1)).sum(2)
    visible = live.unsqueeze(1) & (t.view(1, 1, -1) <= torch.arange(S, device=q.device).view(1, S, 1)
                                   + (lens - S).view(B, 1, 1))
    return logits.masked_fill(~visible, float("-inf"))
