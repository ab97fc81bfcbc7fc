"""Training-only forward of ``ReferenceDSAModel``: dense or top-k attention, plus the indexer's KL loss.

DeepSeek trained V3.2's lightning indexer in two stages, and ``scripts/train_reference.py`` does the same:

* ``Attention.DENSE`` (warm-up): every query attends to every earlier key; the indexer's score is fit to the
  attention distribution (summed over heads, normalised) by KL;
* ``Attention.SPARSE``: the model attends only to the indexer's top-k, as at inference; the LM loss trains
  the model through those keys, and the indexer is still fit by KL, now to the attention restricted to the
  keys it selected.

The indexer reads its inputs detached, so its only gradient is the KL's, and the LM loss never reaches it
(the top-k indices carry no gradient anyway). This path uses the same modules and parameters as the
inference forward (``MLAttention.project`` / ``attend``, ``LightningIndexer.score``) but is a separate
function: the graph that ``torch.compile`` and the IndexCache pass see is the model's ``forward``, unchanged.
"""

from __future__ import annotations

import dataclasses
import enum

import torch
import torch.nn.functional as F

from .model import DSADecoderLayer, ReferenceDSAModel, rope_tables


class Attention(enum.Enum):
    DENSE = "dense"
    SPARSE = "sparse"


@dataclasses.dataclass
class TrainingOutput:
    logits: torch.Tensor  # [B, S, vocab]
    indexer_kl: torch.Tensor  # scalar: KL(attention ‖ indexer), mean over queries, summed over layers


def attention_kl(target: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target ‖ softmax(score)) along the last axis; keys with target 0 add nothing."""
    log_q = torch.log_softmax(score.float(), dim=-1)
    log_q = torch.where(target > 0, log_q, torch.zeros_like(log_q))  # masked keys: -inf score, 0 target
    return (torch.xlogy(target, target) - target * log_q).sum(-1).mean()


def _layer_forward(
    layer: DSADecoderLayer,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_slot: torch.Tensor,
    attention: Attention,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn = layer.attn
    x = layer.attn_norm(h)
    q_latent, q_nope, q_pe, row = attn.project(x, cos, sin)
    score = attn.indexer.score(x.detach(), q_latent.detach(), cos, sin, query_slot, None, 0)  # [B, S, T]
    if attention is Attention.DENSE:
        positions = torch.arange(row.shape[1], device=h.device).view(1, 1, -1)
        out, prob = attn.attend(q_nope, q_pe, row.unsqueeze(1), positions, query_slot, shared_rows=True)
        selected_score = score
    else:
        indices = score.detach().topk(min(attn.indexer.topk, score.shape[-1]), dim=-1).indices  # [B, S, K]
        B, S, K = indices.shape
        D = row.shape[-1]
        picked = torch.gather(row, 1, indices.reshape(B, S * K, 1).expand(B, S * K, D)).view(B, S, K, D)
        out, prob = attn.attend(q_nope, q_pe, picked, indices, query_slot)  # prob [B, S, H, K]
        selected_score = score.gather(-1, indices)
    target = prob.detach().float().mean(dim=2)  # heads summed and renormalised: [B, S, T or K]
    kl = attention_kl(target, selected_score)
    h = h + attn.wo(out)
    h = h + layer.mlp(layer.ffn_norm(h))
    return h, kl


def training_forward(model: ReferenceDSAModel, input_ids: torch.Tensor, attention: Attention) -> TrainingOutput:
    """Logits and the indexers' KL for ``input_ids`` [B, S] (no cache, positions 0 .. S-1)."""
    if not isinstance(attention, Attention):
        raise ValueError(f"attention={attention!r} is invalid: allowed are {[a.value for a in Attention]}")
    if model.index_cache_pattern is not None:
        raise ValueError("training_forward trains every indexer: clear the IndexCache pattern first")
    cfg = model.config
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    cos, sin = rope_tables(positions, cfg.qk_rope_head_dim, cfg.rope_theta)
    h = model.embed(input_ids)
    kl = torch.zeros((), device=input_ids.device)
    for layer in model.layers:
        h, layer_kl = _layer_forward(layer, h, cos, sin, positions, attention)
        kl = kl + layer_kl
    return TrainingOutput(model.lm_head(model.norm(h)), kl)


def next_byte_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of predicting byte t+1 from position t."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
