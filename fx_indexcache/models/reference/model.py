"""A small DeepSeek-V3.2-shaped decoder (MLA + DSA lightning indexer + DeepSeek-V3 MoE) in plain torch.

It is the built-in model that the IndexCache graph pass is developed and tested on, and it carries
a hand-written, model-level IndexCache (``set_index_cache_pattern``) that serves as the oracle.

Module paths (what ``nn_module_stack`` shows in traced graphs)::

    embed
    layers.<i>.attn_norm
    layers.<i>.attn                    MLAttention
    layers.<i>.attn.indexer            LightningIndexer   (its top-k: one aten.topk per layer)
    layers.<i>.ffn_norm
    layers.<i>.mlp                     DenseMLP, or MoE
    layers.<i>.mlp.gate                MoEGate            (three aten.topk per MoE layer)
    layers.<i>.mlp.experts             MoEExperts (computed densely: no data-dependent shapes)
    layers.<i>.mlp.shared_experts      DenseMLP
    norm
    lm_head

Everything is traceable by ``torch.compile(fullgraph=True)``: no ``.item()``, no data-dependent
shapes, no Python branch on tensor values.  Python-level choices (IndexCache pattern, cache or no
cache, ``start_pos``, ``return_indices``) are specialised by dynamo.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import DSACache

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "moe_intermediate_size",
    "max_seq_len",
)
_NON_NEGATIVE_INT_FIELDS = ("first_k_dense_layers", "n_shared_experts")
_POSITIVE_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps", "routed_scaling_factor")


def _bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"DSAModelConfig.{name}={value!r} is invalid: allowed values are {allowed}")


@dataclass(frozen=True)
class DSAModelConfig:
    """Shape of a DeepSeek-V3.2-style model.  Validated on construction (``ValueError`` naming the field)."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 8
    num_heads: int = 4
    q_lora_rank: int = 32
    kv_lora_rank: int = 32
    qk_rope_head_dim: int = 16
    qk_nope_head_dim: int = 16
    v_head_dim: int = 16
    index_n_heads: int = 16
    index_head_dim: int = 32
    index_topk: int = 16
    first_k_dense_layers: int = 2
    intermediate_size: int = 128
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    moe_intermediate_size: int = 32
    n_shared_experts: int = 1
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    routed_scaling_factor: float = 2.5
    # Replace every MoE block by a dense SwiGLU MLP with the same active FLOPs per token
    # (intermediate = moe_intermediate_size * (num_experts_per_tok + n_shared_experts)).
    dense_mlp_instead_of_moe: bool = False

    def __post_init__(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(name, v, "integers >= 1")
        for name in _NON_NEGATIVE_INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _bad(name, v, "integers >= 0")
        for name in _POSITIVE_FLOAT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise _bad(name, v, "finite numbers > 0")
        if not isinstance(self.dense_mlp_instead_of_moe, bool):
            raise _bad("dense_mlp_instead_of_moe", self.dense_mlp_instead_of_moe, "True or False")
        if self.qk_rope_head_dim % 2:
            raise _bad("qk_rope_head_dim", self.qk_rope_head_dim, "even integers >= 2")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise _bad(
                "index_head_dim",
                self.index_head_dim,
                f"integers >= qk_rope_head_dim ({self.qk_rope_head_dim}); RoPE covers its first dims",
            )
        if self.first_k_dense_layers > self.num_layers:
            raise _bad("first_k_dense_layers", self.first_k_dense_layers, f"0 .. num_layers ({self.num_layers})")
        if self.n_routed_experts % self.n_group:
            raise _bad(
                "n_group", self.n_group, f"divisors of n_routed_experts ({self.n_routed_experts})"
            )
        if self.topk_group > self.n_group:
            raise _bad("topk_group", self.topk_group, f"1 .. n_group ({self.n_group})")
        reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > reachable:
            raise _bad(
                "num_experts_per_tok",
                self.num_experts_per_tok,
                f"1 .. topk_group * n_routed_experts / n_group ({reachable})",
            )

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one latent KV cache row: kv-LoRA latent then the RoPE'd shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return 0 if self.dense_mlp_instead_of_moe else self.num_layers - self.first_k_dense_layers

    @property
    def dense_equivalent_intermediate_size(self) -> int:
        return self.moe_intermediate_size * (self.num_experts_per_tok + self.n_shared_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (not self.dense_mlp_instead_of_moe) and layer_idx >= self.first_k_dense_layers

    def replace(self, **overrides) -> "DSAModelConfig":
        return replace(self, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> "DSAModelConfig":
        """Default demo size: 8 layers (2 dense + 6 MoE with 8 experts, top-2), hidden 64, top-k 16.

        With ``num_layers`` below 2 and no explicit ``first_k_dense_layers``, every layer is dense.
        """
        _check_overrides(overrides)
        n = overrides.get("num_layers", cls.num_layers)
        if "first_k_dense_layers" not in overrides and isinstance(n, int) and not isinstance(n, bool):
            overrides["first_k_dense_layers"] = max(0, min(cls.first_k_dense_layers, n))
        return cls(**overrides)

    @classmethod
    def deepseek_v32(cls, num_layers: int = 61, moe: bool = True, **overrides) -> "DSAModelConfig":
        """The real DeepSeek-V3.2 dimensions (no YaRN: plain RoPE with theta 10000).

        ``moe=False`` (or ``dense_mlp_instead_of_moe=True``) swaps every MoE block for a dense MLP with
        the same active FLOPs (intermediate 2048 * (8 + 1) = 18432), for GPU benchmarks.
        Never instantiate the full-size model in tests (671B parameters with MoE).
        """
        _check_overrides(overrides)
        base = dict(
            vocab_size=129280,
            hidden_size=7168,
            num_layers=num_layers,
            num_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
            index_n_heads=64,
            index_head_dim=128,
            index_topk=2048,
            first_k_dense_layers=max(0, min(3, num_layers)) if isinstance(num_layers, int) else 3,
            intermediate_size=18432,
            n_routed_experts=256,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            moe_intermediate_size=2048,
            n_shared_experts=1,
            max_seq_len=163840,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            routed_scaling_factor=2.5,
            dense_mlp_instead_of_moe=not moe,
        )
        base.update(overrides)
        return cls(**base)


def _check_overrides(overrides: dict) -> None:
    known = {f.name for f in fields(DSAModelConfig)}
    for k in overrides:
        if k not in known:
            raise ValueError(f"DSAModelConfig has no field {k!r}; fields are {sorted(known)}")


def validate_index_cache_pattern(pattern: str | None, num_layers: int) -> str | None:
    """Check an IndexCache F/S pattern (one char per layer).  Returns it unchanged, or raises ValueError."""
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ValueError(f"index cache pattern={pattern!r} is invalid: allowed values are None or an F/S string")
    if len(pattern) != num_layers:
        raise ValueError(
            f"index cache pattern={pattern!r} is invalid: length {len(pattern)}, "
            f"must have one character per layer ({num_layers})"
        )
    bad = sorted(set(pattern) - {"F", "S"})
    if bad:
        raise ValueError(f"index cache pattern={pattern!r} is invalid: characters {bad}; allowed are 'F' and 'S'")
    if pattern[0] == "S":
        raise ValueError(
            f"index cache pattern={pattern!r} is invalid: layer 0 is 'S' but has no preceding 'F' layer "
            "to take indices from; the first layer must be 'F'"
        )
    return pattern


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(positions: torch.Tensor, rope_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [len(positions), rope_dim // 2] in fp32 (computed in-graph: no dtype-cast buffers)."""
    exponent = torch.arange(0, rope_dim, 2, dtype=torch.float32, device=positions.device) / rope_dim
    inv_freq = 1.0 / (theta**exponent)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # table [S, R/2] against x [B, S, R] or [B, S, H, R]
    return t.view(1, t.shape[0], 1, t.shape[1]) if x.dim() == 4 else t.view(1, t.shape[0], t.shape[1])


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x0,x1),(x2,x3),... -- the layout of DeepSeek's MLA rope dims."""
    c, s = _bcast(cos, x), _bcast(sin, x)
    xf = x.float()
    even, odd = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)
    return out.to(x.dtype)


def rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the split-in-halves layout (dim j pairs with j + R/2) -- V3.2's indexer layout."""
    c, s = _bcast(cos, x), _bcast(sin, x)
    xf = x.float()
    half = x.shape[-1] // 2
    a, b = xf[..., :half], xf[..., half:]
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1).to(x.dtype)


def _write_rows(buf: torch.Tensor, rows: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Store `rows` [B,S,D] at buf[:, start_pos:start_pos+S] in place; return buf[:, :start_pos+S]."""
    end = start_pos + rows.shape[1]
    buf[:, start_pos:end] = rows.to(buf.dtype)
    return buf[:, :end]


class LightningIndexer(nn.Module):
    """DSA lightning indexer: picks, for each query, the top-k key positions to attend to."""

    def __init__(self, cfg: DSAModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.weight_scale = self.n_heads**-0.5 * self.head_dim**-0.5

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rope_dim
        return torch.cat((rope_halves(t[..., :r], cos, sin), t[..., r:]), dim=-1)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, hidden] (attention input, after attn_norm)
        q_latent: torch.Tensor,  # [B, S, q_lora_rank] (after q_norm)
        cos: torch.Tensor,
        sin: torch.Tensor,
        query_slot: torch.Tensor,  # [S]: position of each query along the key axis
        key_cache: torch.Tensor | None,  # [B, capacity, head_dim] or None
        start_pos: int,
    ) -> torch.Tensor:
        score = self.score(x, q_latent, cos, sin, query_slot, key_cache, start_pos)
        return score.topk(min(self.topk, score.shape[-1]), dim=-1).indices  # int64 [B, S, K]

    def score(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        query_slot: torch.Tensor,
        key_cache: torch.Tensor | None,
        start_pos: int,
    ) -> torch.Tensor:
        """Index score of every (query, key) pair, future keys at -inf: fp32 [B, S, T].

        A method of its own so that training (``reference.training``) can fit the score itself by KL.
        """
        B, S, _ = x.shape
        q = self._rope(self.wq_b(q_latent).view(B, S, self.n_heads, self.head_dim), cos, sin)
        k = self._rope(self.k_norm(self.wk(x)), cos, sin)  # [B, S, Di]
        keys = k if key_cache is None else _write_rows(key_cache, k, start_pos)  # [B, T, Di]
        T = keys.shape[1]

        w = self.weights_proj(x).float() * self.weight_scale  # [B, S, Hi]
        logits = torch.einsum("bshd,btd->bsht", q.float(), keys.float())  # [B, S, Hi, T]
        score = torch.einsum("bsh,bsht->bst", w, F.relu(logits))  # [B, S, T]
        future = torch.arange(T, device=x.device)[None, :] > query_slot[:, None]  # [S, T]
        return score.masked_fill(future, float("-inf"))


class MLAttention(nn.Module):
    """Multi-head latent attention (absorbed form) over the indexer-selected positions only."""

    def __init__(self, cfg: DSAModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_heads
        self.nope = cfg.qk_nope_head_dim
        self.rope = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora = cfg.kv_lora_rank
        self.scale = cfg.qk_head_dim**-0.5
        self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * cfg.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.hidden_size, cfg.kv_cache_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)
        self.indexer = LightningIndexer(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        query_slot: torch.Tensor,
        kv_cache: torch.Tensor | None,
        index_cache: torch.Tensor | None,
        start_pos: int,
        shared_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output [B,S,hidden], the top-k indices used [B,S,K]).

        With ``shared_indices`` given (IndexCache "S" layer) the indexer is not run at all.
        """
        B, S, _ = x.shape
        q_latent, q_nope, q_pe, row = self.project(x, cos, sin)
        keys = row if kv_cache is None else _write_rows(kv_cache, row, start_pos)  # [B, T, D]

        if shared_indices is None:
            indices = self.indexer(x, q_latent, cos, sin, query_slot, index_cache, start_pos)
        else:
            indices = shared_indices
        K = indices.shape[-1]
        D = keys.shape[-1]

        # Gather the selected latent rows: [B, S, K, D]
        picked = torch.gather(keys, 1, indices.reshape(B, S * K, 1).expand(B, S * K, D)).view(B, S, K, D)
        picked = picked.to(x.dtype)
        out, _ = self.attend(q_nope, q_pe, picked, indices, query_slot)
        return self.wo(out), indices

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(q_latent [B,S,q_lora], q_nope [B,S,H,nope], RoPE'd q_pe [B,S,H,rope], latent KV row [B,S,kv_lora+rope])."""
        B, S, _ = x.shape
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).view(B, S, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = rope_pairs(q_pe, cos, sin)

        latent, k_pe = self.wkv_a(x).split([self.kv_lora, self.rope], dim=-1)
        row = torch.cat((self.kv_norm(latent), rope_pairs(k_pe, cos, sin)), dim=-1)  # [B, S, kv_lora+rope]
        return q_latent, q_nope, q_pe, row

    def attend(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        picked: torch.Tensor,  # [B, S, K, D] latent rows per query, or [B, 1, T, D] shared by all queries
        key_pos: torch.Tensor,  # position of each picked row on the key axis, broadcastable to [B, S, K]
        query_slot: torch.Tensor,
        shared_rows: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over the picked rows: (output [B, S, H*v] before ``wo``, probabilities [B, S, H, K]).

        ``shared_rows``: ``picked`` is [B, 1, T, D], one set of rows for every query -- the dense attention
        of training's warm-up (``reference.training``), multiplied without broadcasting copies.
        """
        B, S, H, _ = q_nope.shape
        # Absorb kv_b's key half into the query, its value half after the attention.
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.kv_lora)
        w_key, w_val = w[:, : self.nope], w[:, self.nope :]
        q_latent_heads = torch.einsum("bshn,hnc->bshc", q_nope, w_key)  # [B, S, H, kv_lora]
        q_full = torch.cat((q_latent_heads, q_pe), dim=-1)  # [B, S, H, D]

        if shared_rows:
            rows = picked[:, 0]  # [B, T, D]
            att = torch.matmul(q_full.reshape(B, S * H, -1), rows.transpose(-1, -2)).view(B, S, H, -1)
        else:
            att = torch.matmul(q_full, picked.transpose(-1, -2))
        att = att.float() * self.scale  # [B, S, H, K]
        # top-k returns K indices even when fewer keys are visible: drop the non-causal ones.
        invisible = key_pos > query_slot.view(1, S, 1)  # [B, S, K]
        att = att.masked_fill(invisible.unsqueeze(2), float("-inf"))
        prob = att.softmax(dim=-1).to(q_nope.dtype)
        if shared_rows:
            ctx = torch.matmul(prob.reshape(B, S * H, -1), rows[..., : self.kv_lora]).view(B, S, H, self.kv_lora)
        else:
            ctx = torch.matmul(prob, picked[..., : self.kv_lora])  # [B, S, H, kv_lora]
        out = torch.einsum("bshc,hvc->bshv", ctx, w_val)  # [B, S, H, v]
        return out.reshape(B, S, H * self.v_dim), prob


class DenseMLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEGate(nn.Module):
    """DeepSeek-V3 router: sigmoid affinities + correction bias, group-limited top-k, normalised weights."""

    def __init__(self, cfg: DSAModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(self.n_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights fp32 [N, top_k], expert ids int64 [N, top_k])."""
        N = x.shape[0]
        per_group = self.n_experts // self.n_group
        affinity = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E]
        biased = affinity + self.e_score_correction_bias.float()
        group_score = biased.view(N, self.n_group, per_group).topk(min(2, per_group), dim=-1).values.sum(-1)
        kept_groups = group_score.topk(self.topk_group, dim=-1, sorted=False).indices  # [N, topk_group]
        group_keep = torch.zeros_like(group_score).scatter(1, kept_groups, 1.0).bool()  # [N, G]
        expert_keep = group_keep.unsqueeze(-1).expand(N, self.n_group, per_group).reshape(N, self.n_experts)
        biased = biased.masked_fill(~expert_keep, float("-inf"))
        ids = biased.topk(self.top_k, dim=-1, sorted=False).indices  # [N, top_k]
        weights = affinity.gather(1, ids)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * self.scaling
        return weights, ids


class MoEExperts(nn.Module):
    """All routed experts' SwiGLU weights; every expert runs on every token (static shapes)."""

    def __init__(self, cfg: DSAModelConfig) -> None:
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.w1 = nn.Parameter(torch.empty(E, I, H))
        self.w3 = nn.Parameter(torch.empty(E, I, H))
        self.w2 = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """x [N, H], combine [N, E] (routing weight, 0 for unrouted experts) -> [N, H]."""
        gate = torch.einsum("nh,eih->nei", x, self.w1)
        up = torch.einsum("nh,eih->nei", x, self.w3)
        act = F.silu(gate) * up * combine.unsqueeze(-1)
        return torch.einsum("nei,ehi->nh", act, self.w2)


class MoE(nn.Module):
    def __init__(self, cfg: DSAModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = MoEGate(cfg)
        self.experts = MoEExperts(cfg)
        self.shared_experts = (
            DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.gate(flat)
        combine = torch.zeros(flat.shape[0], self.n_experts, dtype=torch.float32, device=x.device)
        combine = combine.scatter(1, ids, weights).to(x.dtype)
        out = self.experts(flat, combine)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


class DSADecoderLayer(nn.Module):
    def __init__(self, cfg: DSAModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(cfg)
        elif layer_idx < cfg.first_k_dense_layers:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        else:  # dense_mlp_instead_of_moe: same active FLOPs as the MoE it replaces
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_equivalent_intermediate_size)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        query_slot: torch.Tensor,
        kv_cache: torch.Tensor | None,
        index_cache: torch.Tensor | None,
        start_pos: int,
        shared_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, indices = self.attn(
            self.attn_norm(h), cos, sin, query_slot, kv_cache, index_cache, start_pos, shared_indices
        )
        h = h + a
        h = h + self.mlp(self.ffn_norm(h))
        return h, indices


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class ReferenceDSAModel(nn.Module):
    """Embedding -> DSA decoder layers -> RMSNorm -> lm_head.

    ``forward(input_ids, cache=None, start_pos=0, return_indices=False, logits_to_keep=None)``
    returns logits ``[B, S', vocab]`` in the model's dtype (``S'`` = S, or ``logits_to_keep``),
    or ``(logits, indices)`` with ``return_indices=True`` where ``indices[i]`` is the int64
    ``[B, S, K]`` top-k tensor layer ``i`` attended with (``K = min(index_topk, T)``; an S layer's
    entry is the very tensor of the F layer it reuses).
    """

    def __init__(
        self,
        config: DSAModelConfig,
        *,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, DSAModelConfig):
            raise ValueError(f"config={config!r} is invalid: must be a DSAModelConfig")
        self.config = config
        with torch.device(device if device is not None else "cpu"):
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList(DSADecoderLayer(config, i) for i in range(config.num_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._index_cache_pattern: str | None = None
        self.reset_parameters(seed)
        if dtype is not None:
            self.to(dtype)
        self.eval()

    # ---- weights -------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Deterministic init from `seed` (same device type + seed -> same weights).

        Scales keep activations O(1) so that top-k selections are well separated.
        """
        dev = self.lm_head.weight.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)

        def normal_(p: torch.Tensor, std: float) -> None:
            p.copy_(torch.randn(p.shape, generator=gen, device=dev, dtype=torch.float32).mul_(std))

        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                normal_(mod.weight, mod.in_features**-0.5)
            elif isinstance(mod, nn.Embedding):
                normal_(mod.weight, 1.0)
            elif isinstance(mod, (RMSNorm, nn.LayerNorm)):
                mod.weight.fill_(1.0)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif isinstance(mod, MoEGate):
                normal_(mod.weight, mod.weight.shape[1] ** -0.5)
                normal_(mod.e_score_correction_bias, 0.05)
            elif isinstance(mod, MoEExperts):
                normal_(mod.w1, mod.w1.shape[-1] ** -0.5)
                normal_(mod.w3, mod.w3.shape[-1] ** -0.5)
                normal_(mod.w2, mod.w2.shape[-1] ** -0.5)

    # ---- IndexCache (hand-written oracle) ------------------------------------------------
    def set_index_cache_pattern(self, pattern: str | None) -> None:
        """F/S string, one char per layer (None: every layer runs its indexer).

        An 'S' layer does not run its indexer (no scoring, no top-k, no indexer-key-cache write);
        it attends with the indices of the nearest preceding 'F' layer.  A leading 'S' raises.
        """
        self._index_cache_pattern = validate_index_cache_pattern(pattern, self.config.num_layers)

    @property
    def index_cache_pattern(self) -> str | None:
        return self._index_cache_pattern

    # ---- cache ---------------------------------------------------------------------------
    def new_cache(
        self,
        batch_size: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        max_seq_len: int | None = None,
    ) -> DSACache:
        """Zeroed cache: per layer kv [B, cap, kv_lora+rope] and index_k [B, cap, index_head_dim].

        Defaults: the model's dtype and device, capacity ``config.max_seq_len``.
        """
        cfg = self.config
        p = self.lm_head.weight
        return DSACache.allocate(
            cfg.num_layers,
            batch_size,
            cfg.max_seq_len if max_seq_len is None else max_seq_len,
            cfg.kv_cache_dim,
            cfg.index_head_dim,
            dtype=p.dtype if dtype is None else dtype,
            device=p.device if device is None else device,
        )

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: DSACache | None = None,
        start_pos: int = 0,
        return_indices: bool = False,
        logits_to_keep: int | None = None,
    ):
        """input_ids [B, S] int64.

        With ``cache``: writes cache rows start_pos .. start_pos+S-1 and attends over positions
        [0, start_pos+S).  Without: attends over the S tokens of this call (RoPE positions still
        start at ``start_pos``).
        """
        cfg = self.config
        B, S = input_ids.shape
        dev = input_ids.device
        if cache is not None:
            if cache.num_layers != cfg.num_layers:
                raise ValueError(f"cache has {cache.num_layers} layers, model has {cfg.num_layers}")
            if cache.batch_size != B:
                raise ValueError(f"cache batch size {cache.batch_size} != input batch size {B}")
            if start_pos < 0 or start_pos + S > cache.capacity:
                raise ValueError(
                    f"start_pos={start_pos} with {S} tokens does not fit the cache capacity {cache.capacity}"
                )
        elif start_pos < 0:
            raise ValueError(f"start_pos={start_pos} is invalid: must be >= 0")

        offsets = torch.arange(S, device=dev)
        cos, sin = rope_tables(offsets + start_pos, cfg.qk_rope_head_dim, cfg.rope_theta)
        # Where each query sits on the key axis (keys are cache rows 0.. with a cache, else this call's tokens).
        query_slot = offsets + start_pos if cache is not None else offsets

        pattern = self._index_cache_pattern
        h = self.embed(input_ids)
        used: list[torch.Tensor] = []
        last_f: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            shared = last_f if (pattern is not None and pattern[i] == "S") else None
            h, idx = layer(
                h,
                cos,
                sin,
                query_slot,
                None if cache is None else cache.kv[i],
                None if cache is None else cache.index_k[i],
                start_pos,
                shared,
            )
            if shared is None:
                last_f = idx
            used.append(idx)

        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(h))
        if return_indices:
            return logits, used
        return logits
