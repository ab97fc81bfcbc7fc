"""A zoo of DSA lightning indexers, each the same math written another way (shared by CPU and GPU tests).

Every layout computes ``score[s, t] = sum_h w[s, h] * relu(c * q[s, h] . k[t])`` (batched or not), masks
the future keys and returns ``(masked score, top-k indices)``. They differ in what the matcher must
see through: unbatched 2-D scores, the head axis in every position, k as a whole buffer, a slice or a
gather (with or without a singleton head axis), the scale in q, k, the score or the weights, the
head sum as mul+sum, einsum, matmul or bmm, the ReLU as relu or a maximum with zero, and the mask by
``masked_fill``, ``where`` or addition. ``make_inputs`` gives each layout its own leaves from one set of canonical tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

NEG = float("-inf")


def future(S: int, T: int, device) -> torch.Tensor:
    """[S, T] bool: key t lies after query s (queries are the last S of T positions)."""
    s = torch.arange(S, device=device)[:, None] + (T - S)
    return torch.arange(T, device=device)[None, :] > s


def _top(score: torch.Tensor, topk: int):
    return score, score.topk(min(topk, score.shape[-1]), dim=-1).indices


# --- unbatched: q [S, H, D], key cache [T_max, D], w [S, H] ---------------------------------------


def unbatched_slice_masked_fill(q, k_cache, w, T: int, topk: int):
    """Sliced cache, mul+sum head sum, masked_fill (the model style of issue 13)."""
    k = k_cache[:T]
    s = torch.relu(torch.einsum("shd,td->sht", q.float(), k.float()))
    score = (s * w[..., None]).sum(1)
    return _top(score.masked_fill(future(q.shape[0], T, q.device), NEG), topk)


def unbatched_head_major_where(q_hsd, k, w, T: int, topk: int):
    """q [H, S, D] with the scale folded into fp32 q, whole key buffer, einsum head sum, where-mask."""
    qf = q_hsd.float() * (q_hsd.shape[-1] ** -0.5)
    s = torch.relu(torch.einsum("hsd,td->hst", qf, k.float()))
    score = torch.einsum("hst,sh->st", s, w)
    return _top(torch.where(future(q_hsd.shape[1], T, q_hsd.device), NEG, score), topk)


def unbatched_gather_matmul(q, k_cache, w, positions, topk: int):
    """Gathered keys, matmul products, the scale on the score, additive float mask."""
    k = k_cache.index_select(0, positions)
    T = k.shape[0]
    s = torch.relu(torch.matmul(q.float(), k.float().T))  # [S, H, T]
    score = torch.matmul(w.unsqueeze(1), s).squeeze(1) * 0.125
    mask = torch.zeros(q.shape[0], T, device=q.device).masked_fill(future(q.shape[0], T, q.device), NEG)
    return _top(score + mask, topk)


def unbatched_bf16_scaled_weights(q, k_cache, w_bf16, T: int, topk: int):
    """w scaled in bf16 (that product is the leaf the kernel reads), head axis last: [S, T, H]."""
    k = k_cache[:T]
    w_scaled = w_bf16 * 0.5  # bf16 rounding belongs to the model: not folded
    s = torch.relu(torch.einsum("shd,td->sth", q.float(), k.float()))
    score = (s * w_scaled[:, None, :]).sum(-1)
    return _top(score.masked_fill(future(q.shape[0], T, q.device), NEG), topk)


# --- batched: q [B, S, H, D], key cache [B, T_max, D], w [B, S, H] ---------------------------------


def batched_bshT_scale_in_k(q, k_cache, w, T: int, topk: int):
    """[B, S, H, T] einsum, the scale folded into fp32 k, fp32-scaled weights, where-mask."""
    k = k_cache[:, :T].float() * (q.shape[-1] ** -0.5)
    s = torch.relu(torch.einsum("bshd,btd->bsht", q.float(), k))
    score = torch.einsum("bsht,bsh->bst", s, w.float() * 0.5)
    return _top(torch.where(future(q.shape[1], T, q.device), NEG, score), topk)


def batched_bhst_bmm(q, k_cache, w, T: int, topk: int):
    """Head-major bmm over a [B*H] batch, keys broadcast over heads, mul+sum head sum, additive mask."""
    B, S, H, D = q.shape
    qh = q.transpose(1, 2).reshape(B * H, S, D).float()
    kh = k_cache[:, :T, None].expand(B, T, H, D).transpose(1, 2).reshape(B * H, T, D).float()
    s = torch.relu(torch.bmm(qh, kh.transpose(1, 2))).view(B, H, S, T)
    score = (s * w.permute(0, 2, 1)[..., None]).sum(1)
    mask = torch.zeros(S, T, device=q.device).masked_fill(future(S, T, q.device), NEG)
    return _top(score + mask, topk)


def batched_singleton_head_k_gather(q, k_cache, w, positions, topk: int):
    """Gathered keys with a singleton head axis [B, T, 1, D], broadcast mul+sum products, masked_fill."""
    k = k_cache[:, positions].unsqueeze(2)
    T = k.shape[1]
    s = torch.relu((q.float()[:, :, None] * k.float()[:, None]).sum(-1))  # [B, S, T, H]
    score = (s * w[:, :, None, :]).sum(-1)
    return _top(score.masked_fill(future(q.shape[1], T, q.device), NEG), topk)


def batched_bhsd_scale_after_relu(q_bhsd, k_cache, w, T: int, topk: int):
    """q [B, H, S, D], the scale applied after the ReLU, einsum head sum over [B, H, S, T]."""
    k = k_cache[:, :T]
    s = torch.relu(torch.einsum("bhsd,btd->bhst", q_bhsd.float(), k.float())) * 0.25
    score = torch.einsum("bhst,bsh->bst", s, w)
    return _top(score.masked_fill(future(q_bhsd.shape[2], T, q_bhsd.device), NEG), topk)


def unbatched_linear_maximum_triu(q, k_cache, w, T: int, topk: int):
    """Products by ``F.linear``, the ReLU as a maximum with a zero scalar, a sum over the head axis of the weighted
    products, the future masked by adding an upper-triangular matrix of -inf."""
    k = k_cache[:T].float()
    s = torch.nn.functional.linear(q.float(), k)  # [S, H, T]
    s = torch.maximum(s, s.new_zeros(()))
    score = torch.sum(s * w[:, :, None], dim=1)
    S = q.shape[0]
    return _top(score + torch.full((S, T), NEG, device=q.device).triu(T - S + 1), topk)


def batched_select_relu_head_mean(q, k_cache, w, T: int, topk: int):
    """The ReLU as ``where(s > 0, s, 0)``, the heads averaged (``mean``: the sum and a factor 1/H), q.k as a
    broadcast multiply averaged over d (a factor 1/D before the ReLU), a ``where`` mask."""
    k = k_cache[:, :T].float()
    s = (q.float()[:, :, :, None, :] * k[:, None, None]).mean(-1)  # [B, S, H, T]
    s = torch.where(s > 0, s, 0.0)
    score = (s * w[..., None]).mean(2)
    return _top(torch.where(future(q.shape[1], T, q.device), NEG, score), topk)


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    fn: Callable
    batched: bool
    q_roles: str  # what the matcher must prove, for the q leaf it picks
    args: str  # "slice" (q, k_cache, w, T), "gather" (q, k_cache, w, positions), "hsd"/"bhsd" (q re-laid out)


LAYOUTS = [
    Layout("unbatched_slice_masked_fill", unbatched_slice_masked_fill, False, "shd", "slice"),
    Layout("unbatched_head_major_where", unbatched_head_major_where, False, "hsd", "hsd_whole"),
    Layout("unbatched_gather_matmul", unbatched_gather_matmul, False, "shd", "gather"),
    Layout("unbatched_bf16_scaled_weights", unbatched_bf16_scaled_weights, False, "shd", "slice_wbf16"),
    Layout("batched_bshT_scale_in_k", batched_bshT_scale_in_k, True, "bshd", "slice"),
    Layout("batched_bhst_bmm", batched_bhst_bmm, True, "bshd", "slice"),
    Layout("batched_singleton_head_k_gather", batched_singleton_head_k_gather, True, "bshd", "gather"),
    Layout("batched_bhsd_scale_after_relu", batched_bhsd_scale_after_relu, True, "bhsd", "bhsd"),
    Layout("unbatched_linear_maximum_triu", unbatched_linear_maximum_triu, False, "shd", "slice"),
    Layout("batched_select_relu_head_mean", batched_select_relu_head_mean, True, "bshd", "slice"),
]


def make_inputs(layout: Layout, *, B=2, S=6, T=24, T_max=32, H=4, D=16, topk=5, device="cpu",
                dtype=torch.bfloat16, seed=0) -> tuple:
    """The layout's arguments from fresh canonical tensors (batched layouts get B rows, others one)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, S, H, D, device=device, generator=g).to(dtype)
    k_cache = torch.randn(B, T_max, D, device=device, generator=g).to(dtype)
    w = torch.randn(B, S, H, device=device, generator=g) * H**-0.5
    positions = torch.randperm(T_max, device=device, generator=g)[:T].sort().values
    if not layout.batched:
        q, k_cache, w = q[0], k_cache[0], w[0]
    kind = layout.args
    if kind == "slice":
        return q, k_cache, w, T, topk
    if kind == "slice_wbf16":
        return q, k_cache, w.to(dtype), T, topk
    if kind == "gather":
        return q, k_cache, w, positions, topk
    if kind == "hsd_whole":
        return q.transpose(0, 1).contiguous(), k_cache[:T].contiguous(), w, T, topk
    if kind == "bhsd":
        return q.transpose(1, 2).contiguous(), k_cache, w, T, topk
    raise ValueError(f"unknown layout args {kind!r}")


# --- native low precision (issue 28): the score computed in the model's dtype, as most models write it -------
# Each returns (masked score, top-k indices) like the layouts above; ``numerics`` is the contract the fused
# path must report (``fuse.substitute.EXACT`` / ``FP32_INSIDE``) and ``dtype`` the q/k dtype it is fed.


def native_einsum_unbatched(q, k_cache, w, T: int, topk: int):
    """The issue's style: q [S, H, D], a key cache [T, D], einsum + ReLU in bf16, mul+sum head sum, masked_fill."""
    k = k_cache[:T]
    score = (torch.einsum("shd,td->sht", q, k).relu() * w[:, :, None]).sum(1)
    return _top(score.masked_fill(future(q.shape[0], T, q.device), NEG), topk)


def native_matmul_unbatched(q, k_cache, w, T: int, topk: int):
    """matmul instead of einsum (fp16 in the tests), a where-mask."""
    k = k_cache[:T]
    score = (torch.matmul(q, k.T).relu() * w[:, :, None]).sum(1)
    return _top(torch.where(future(q.shape[0], T, q.device), NEG, score), topk)


def native_batched_bmm_head_sum(q, k_cache, w, T: int, topk: int):
    """Batched: a broadcasting matmul over [B, H, S, T], the head sum as an einsum (a bmm in bf16)."""
    k = k_cache[:, :T]
    s = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).unsqueeze(1)).relu()
    score = torch.einsum("bhst,bsh->bst", s, w)
    return _top(score.masked_fill(future(q.shape[1], T, q.device), NEG), topk)


def bf16_product_fp32_head_sum(q, k_cache, w, T: int, topk: int):
    """The q.k product rounded to bf16 by the model, the head sum in fp32 on fp32 weights: an fp32 score."""
    k = k_cache[:T]
    score = torch.einsum("sht,sh->st", torch.einsum("shd,td->sht", q, k).relu().float(), w.float())
    return _top(score.masked_fill(future(q.shape[0], T, q.device), NEG), topk)


def fp32_math_rounded_score(q, k_cache, w, T: int, topk: int):
    """fp32 products rounded once, to bf16, at the score: the graph's own math, which the kernel keeps exactly."""
    k = k_cache[:T]
    score = (torch.einsum("shd,td->sht", q.float(), k.float()).relu() * w.float()[:, :, None]).sum(1)
    score = score.to(q.dtype)
    return _top(score.masked_fill(future(q.shape[0], T, q.device), NEG), topk)


def head_sum_accumulates_in_fp32(q, k_cache, w, T: int, topk: int):
    """All bf16, but the head sum asks for fp32 accumulation (``sum(..., dtype=torch.float32)``): an fp32 score."""
    k = k_cache[:T]
    score = (torch.einsum("shd,td->sht", q, k).relu() * w[:, :, None]).sum(1, dtype=torch.float32)
    return _top(score.masked_fill(future(q.shape[0], T, q.device), NEG), topk)


def dot_as_mul_sum_in_fp32(q, k_cache, w, T: int, topk: int):
    """q.k as a broadcast bf16 mul summed in fp32: each product is rounded to bf16 before the fp32 sum, so the
    products' rounding (not the sum's dtype) decides the contract."""
    k = k_cache[:T]
    qk = (q[:, :, None, :] * k[None, None]).sum(-1, dtype=torch.float32)  # [S, H, T]
    score = (qk.relu() * w.float()[:, :, None]).sum(1)
    return _top(score.masked_fill(future(q.shape[0], T, q.device), NEG), topk)


def q_rounded_in_graph(q_fp32, k_cache, w, T: int, topk: int):
    """q arrives in fp32 and the model rounds it to the cache's dtype: the rounded q is the kernel's leaf."""
    return native_einsum_unbatched(q_fp32.to(k_cache.dtype), k_cache, w, T, topk)


@dataclasses.dataclass(frozen=True)
class NativeLayout:
    name: str
    fn: Callable
    batched: bool
    dtype: torch.dtype  # of q and k (w too unless the layout upcasts it)
    numerics: str  # "exact" or "fp32_inside"
    q_fp32: bool = False  # q handed in fp32 (the graph rounds it)


NATIVE_LAYOUTS = [
    NativeLayout("native_einsum_unbatched_bf16", native_einsum_unbatched, False, torch.bfloat16, "fp32_inside"),
    NativeLayout("native_matmul_unbatched_fp16", native_matmul_unbatched, False, torch.float16, "fp32_inside"),
    NativeLayout("native_batched_bmm_head_sum_bf16", native_batched_bmm_head_sum, True, torch.bfloat16, "fp32_inside"),
    NativeLayout("bf16_product_fp32_head_sum", bf16_product_fp32_head_sum, False, torch.bfloat16, "fp32_inside"),
    NativeLayout("fp32_math_rounded_score_bf16", fp32_math_rounded_score, False, torch.bfloat16, "exact"),
    NativeLayout("q_rounded_in_graph_bf16", q_rounded_in_graph, False, torch.bfloat16, "fp32_inside", q_fp32=True),
    NativeLayout("head_sum_accumulates_in_fp32_bf16", head_sum_accumulates_in_fp32, False, torch.bfloat16,
                 "fp32_inside"),
    NativeLayout("dot_as_mul_sum_in_fp32_bf16", dot_as_mul_sum_in_fp32, False, torch.bfloat16, "fp32_inside"),
]


def make_native_inputs(layout: NativeLayout, *, B=2, S=6, T=24, T_max=32, H=4, D=16, topk=5, device="cpu",
                       seed=0) -> tuple:
    """(q, k_cache, w, T, topk) for a native layout: q/k/w in ``layout.dtype`` (q fp32 where the graph rounds it)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, S, H, D, device=device, generator=g)
    k_cache = torch.randn(B, T_max, D, device=device, generator=g).to(layout.dtype)
    w = (torch.randn(B, S, H, device=device, generator=g) * H**-0.5).to(layout.dtype)
    q = q if layout.q_fp32 else q.to(layout.dtype)
    if not layout.batched:
        q, k_cache, w = q[0], k_cache[0], w[0]
    return q, k_cache, w, T, topk


def exact_score(layout: NativeLayout, q, k_cache, w, T: int) -> torch.Tensor:
    """The masked score in float64 from the kernel's leaves (q rounded to the layout's dtype as the graph does)."""
    q = q.to(layout.dtype).double()
    k, w = (k_cache[:, :T] if layout.batched else k_cache[:T]).double(), w.double()
    if layout.batched:
        score = torch.einsum("bsht,bsh->bst", torch.einsum("bshd,btd->bsht", q, k).relu(), w)
    else:
        score = torch.einsum("sht,sh->st", torch.einsum("shd,td->sht", q, k).relu(), w)
    return score.masked_fill(future(score.shape[-2], T, score.device), NEG)
