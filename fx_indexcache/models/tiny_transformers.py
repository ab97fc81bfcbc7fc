"""Tiny, randomly initialised DSA models from transformers (the CLI's ``--hf-model``, examples, tests).

Nothing here is downloaded: each builder makes a 3-layer model (hidden size 32) from the model's
own config class. ``TINY_DSA_MODELS`` holds the models with an indexer the pass shares: a
DeepSeek-Sparse-Attention lightning indexer (one ``ReLU(q·k)``-scored top-k per DSA layer) or
MiniMax-M3's block indexer (a top-k over max-pooled q·k key blocks, ``detection/block_topk.py``).
``TINY_OTHER_INDEXER_MODELS`` holds models whose sparse-attention "indexer" no graph holds as one
top-k per layer, on which the pass must change nothing.

The model-specific knowledge (where the decoder layers and their indexers live, how many top-k
one MoE router holds) is in ``SPECS``, one row per model. The IndexCache oracle the tests compare
against (indexer modules patched, no graph pass) lives with the tests, in ``tests/hf_oracle.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: Decoder layers of every tiny model: enough for F, S and a second F (tests compile each model).
_LAYERS = 3
#: Hidden sizes shared by the tiny configs (kept small: tests compile each model several times).
_TINY = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=_LAYERS,
    num_attention_heads=2,
    max_position_embeddings=256,
    pad_token_id=None,
    bos_token_id=0,
    eos_token_id=1,
)
#: DeepSeek-V3-style MLA + DSA indexer + group-limited MoE router (V3.2, GLM-MoE-DSA, AXK2, HY-V4).
_MLA_DSA = dict(
    _TINY,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_key_value_heads=2,
    n_shared_experts=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    index_topk=4,
    index_head_dim=16,
    index_n_heads=2,
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one tiny model and where its DSA indexers are."""

    name: str
    module: str  # transformers.models.<module>
    config_class: str
    model_class: str
    config: dict[str, Any]
    layers_path: str  # attribute path from the model to its decoder-layer ModuleList
    indexer_path: str  # attribute path from a decoder layer to its indexer (None where the layer has none)
    router_topk_per_moe_layer: int  # aten.topk nodes one MoE router holds in the graph
    moe_layer_types: tuple[str, ...] = ("sparse",)  # mlp_layer_types entries that are MoE layers
    output: str = "logits"  # the output field compared by the checks
    #: torch._dynamo config patches the model needs to trace into one graph (data-dependent shapes).
    dynamo_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Why the pass cannot (or must not) share indices in this model; None where it does.
    limitation: str | None = None
    #: Why transformers cannot run this model with a static cache (so no compiled decoding); None where it can.
    no_static_cache: str | None = None
    #: Why decode graphs traced with dynamic shapes keep S layers as they are although prefill shares; None: they share.
    decode_limitation: str | None = None

    @property
    def transformers_module(self):
        return importlib.import_module(f"transformers.models.{self.module}")

    def config_object(self, **overrides: Any):
        module = importlib.import_module(f"transformers.models.{self.module}.configuration_{self.module}")
        config = getattr(module, self.config_class)(**{**self.config, **overrides})
        config._attn_implementation = "eager"
        return config

    def moe_layers(self, config) -> int:
        types = getattr(config, "mlp_layer_types", None)
        if types is None:  # every layer is MoE
            return config.num_hidden_layers
        return sum(t in self.moe_layer_types for t in types)

    def expected_router_topk(self, config) -> int:
        return self.router_topk_per_moe_layer * self.moe_layers(config)


SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "deepseek_v32", "deepseek_v32", "DeepseekV32Config", "DeepseekV32ForCausalLM",
            dict(_MLA_DSA, first_k_dense_replace=1),
            "model.layers", "self_attn.indexer", router_topk_per_moe_layer=3,
        ),
        ModelSpec(
            "glm_moe_dsa", "glm_moe_dsa", "GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
            # indexer_types all "full": the model's own cross-layer sharing is off, the pass does it.
            dict(_MLA_DSA, first_k_dense_replace=1, indexer_types=["full"] * _LAYERS),
            "model.layers", "self_attn.indexer", router_topk_per_moe_layer=3,
        ),
        ModelSpec(
            "axk2", "axk2", "AXK2Config", "AXK2ForCausalLM",
            dict(_MLA_DSA, first_k_dense_replace=1),
            "model.layers", "self_attn.indexer", router_topk_per_moe_layer=3,
        ),
        ModelSpec(
            "hy_v4", "hy_v4", "HYV4Config", "HYV4ForCausalLM",
            # HY-V4's default indexer_types already shares (F at 0, 1, 5, ...): make every layer full.
            dict(_MLA_DSA, indexer_types=["full"] * _LAYERS, hc_mult=2),
            "model.layers", "self_attn.indexer", router_topk_per_moe_layer=3,
        ),
        ModelSpec(
            "deepseek_v4", "deepseek_v4", "DeepseekV4Config", "DeepseekV4ForCausalLM",
            dict(
                _TINY,
                moe_intermediate_size=16, num_key_value_heads=1, head_dim=16, q_lora_rank=16,
                num_experts_per_tok=2, n_routed_experts=4, hc_mult=2, hc_sinkhorn_iters=2,
                sliding_window=8, o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=16,
                index_topk=2, compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 8},
                # every layer compressed-sparse (the layers with an indexer); hash-routed MoE off
                layer_types=["compressed_sparse_attention"] * _LAYERS, mlp_layer_types=["moe"] * _LAYERS,
            ),
            "model.layers", "self_attn.compressor.indexer", router_topk_per_moe_layer=1,
            moe_layer_types=("moe",),
            no_static_cache=(
                "transformers has no static cache layer for its compressed-sparse-attention layers "
                "(StaticCache raises KeyError: 'compressed_sparse_attention'), so generate() cannot decode it "
                "with cache_implementation='static', the only cache transformers compiles decoding with; a "
                "compiled model.forward with the default dynamic cache still applies IndexCache, without the "
                "fixed shapes CUDA graphs need"
            ),
        ),
        ModelSpec(
            "glm5_next", "glm5_next", "Glm5NextTextConfig", "Glm5NextTextModel",
            dict(
                _MLA_DSA, qk_rope_head_dim=0, qk_nope_head_dim=16, index_kpool=2, hc_mult=2,
                linear_head_dim=8, linear_num_heads=2, first_k_dense_replace=1,
                layer_types=["indexed_attention"] * _LAYERS, indexer_types=["full"] * _LAYERS,
                mlp_layer_types=["dense"] + ["sparse"] * (_LAYERS - 1),
            ),
            "layers", "self_attn.indexer", router_topk_per_moe_layer=3, output="last_hidden_state",
            dynamo_config=dict(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True),
            decode_limitation=(
                "k-pool indexer: each layer's top-k width is min(index_topk // kpool, pooled length), the pooled "
                "length a data-dependent count of True entries of the layer's pool-validity mask "
                "(`pool_keys[:, keep]`). "
                "In prefill every layer's mask is computed from the same attention mask, which the pass proves by "
                "value numbering, so the widths are equal and S layers share; in decode each mask is read from the "
                "layer's own indexer cache (a separate graph input), so equal widths are not provable and S layers "
                "compute (without capture_dynamic_output_shape_ops the model graph-breaks inside every indexer)"
            ),
        ),
        ModelSpec(
            "minimax_m3_vl", "minimax_m3_vl", "MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM",
            dict(
                _TINY, intermediate_size=32, num_key_value_heads=2, head_dim=16, num_experts_per_tok=2,
                num_local_experts=4, dense_intermediate_size=32, shared_intermediate_size=16, rotary_dim=8,
                index_n_heads=2, index_head_dim=8, index_block_size=2, index_topk_blocks=2,
                index_local_blocks=1, layer_types=["minimax_m3_sparse"] * _LAYERS,
            ),
            "model.layers", "self_attn.indexer", router_topk_per_moe_layer=1,
            decode_limitation=(
                "block indexer: k = min(index_topk_blocks, key blocks), and each layer's indexer key cache is its "
                "own graph input; once dynamo traces decode with dynamic shapes, every layer's cache length is a "
                "separate symbol, so equal block counts are not provable and S layers compute there (graphs with "
                "static shapes: prefill, the first decode step, a static cache, share)"
            ),
        ),
    ]
}

#: Sparse-attention models whose selection is not a DSA lightning indexer the pass may share.
OTHER_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "qwen4_exp", "qwen4_exp", "Qwen4ExpTextConfig", "Qwen4ExpForCausalLM",
            dict(
                _TINY, num_key_value_heads=1, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
                linear_num_key_heads=2, linear_num_value_heads=2, moe_intermediate_size=16,
                shared_expert_intermediate_size=16, num_experts_per_tok=2, num_experts=4,
                layer_types=["indexed_attention"] * _LAYERS, hc_count=2, hc_lowrank=8, indexer_n_heads=2,
                indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4, indexer_compress_ratio=2,
            ),
            "model.layers", "self_attn.indexer", router_topk_per_moe_layer=1,
            limitation=(
                "QSA indexer: a Python loop over batch and query positions with torch.nonzero, one "
                "block top-k per query, returning a mask; torch.compile graph-breaks inside it, so no "
                "graph holds a per-layer indexer top-k"
            ),
        ),
    ]
}


def _get_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        if root is None:
            return None
        root = root[int(part)] if part.isdigit() else getattr(root, part, None)
    return root


def indexer_modules(model: nn.Module, spec: ModelSpec) -> dict[int, nn.Module]:
    """The indexer module of every decoder layer that has one, by global layer index."""
    layers = _get_path(model, spec.layers_path)
    found = {}
    for index, layer in enumerate(layers):
        indexer = _get_path(layer, spec.indexer_path)
        if indexer is not None:
            found[index] = indexer
    return found


def spec_of(model: nn.Module) -> ModelSpec:
    """The ``SPECS`` / ``OTHER_SPECS`` row whose model class ``model`` is."""
    for spec in (*SPECS.values(), *OTHER_SPECS.values()):
        if type(model).__name__ == spec.model_class:
            return spec
    raise KeyError(f"no spec for {type(model).__name__}")


@dataclasses.dataclass
class TinyModel:
    """One built tiny model: ``model``, ``make_inputs(seq_len, seed)``, and facts about it."""

    spec: ModelSpec
    model: nn.Module
    config: Any
    make_inputs: Callable[..., dict[str, torch.Tensor]]

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def dsa_layers(self) -> list[int]:
        return sorted(indexer_modules(self.model, self.spec))

    @property
    def expected_router_topk(self) -> int:
        return self.spec.expected_router_topk(self.config)


def build(spec: ModelSpec, seed: int = 0, num_layers: int | None = None, **config_overrides: Any) -> TinyModel:
    """Build ``spec``'s tiny model in eval mode with weights from ``torch.manual_seed(seed)``.

    ``num_layers`` keeps only the first layers (per-layer lists in the config are cut to match).
    """
    if num_layers is not None:
        config_overrides.setdefault("num_hidden_layers", num_layers)
        for key, value in spec.config.items():
            if isinstance(value, list) and len(value) == spec.config["num_hidden_layers"]:
                config_overrides.setdefault(key, value[:num_layers])
    config = spec.config_object(**config_overrides)
    torch.manual_seed(seed)
    model = getattr(spec.transformers_module, spec.model_class)(config).eval()
    vocab = config.vocab_size

    def make_inputs(seq_len: int = 12, seed: int = 0, batch: int = 1) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(1000 + seed)
        # ids >= 2 so that no bos/eos/pad id appears mid-sequence
        return {"input_ids": torch.randint(2, vocab, (batch, seq_len), generator=generator)}

    return TinyModel(spec, model, config, make_inputs)


TINY_DSA_MODELS: dict[str, Callable[[], TinyModel]] = {
    name: functools.partial(build, spec) for name, spec in SPECS.items()
}
TINY_OTHER_INDEXER_MODELS: dict[str, Callable[[], TinyModel]] = {
    name: functools.partial(build, spec) for name, spec in OTHER_SPECS.items()
}


def output_of(result: Any, spec: ModelSpec) -> torch.Tensor:
    return getattr(result, spec.output)


@torch.no_grad()
def prefill_and_decode(model: Callable, tiny: TinyModel, prompt_len: int = 12, steps: int = 2) -> list[torch.Tensor]:
    """Prefill ``prompt_len`` tokens with a fresh cache, then ``steps`` one-token decode steps.

    ``model`` is the eager model or a compiled one; the decode tokens are fixed (not sampled),
    so two runs see the same inputs whatever their outputs. Returns every step's output tensor.
    """
    result = model(**tiny.make_inputs(prompt_len), use_cache=True)
    cache = result.past_key_values
    outputs = [output_of(result, tiny.spec)]
    for step in range(steps):
        token = tiny.make_inputs(1, seed=100 + step)
        result = model(**token, past_key_values=cache, use_cache=True)
        cache = result.past_key_values
        outputs.append(output_of(result, tiny.spec))
    return outputs


@torch.no_grad()
def prefill(model: Callable, tiny: TinyModel, prompt_len: int = 12) -> torch.Tensor:
    """One forward pass without a cache."""
    return output_of(model(**tiny.make_inputs(prompt_len), use_cache=False), tiny.spec)


def dynamo_config(tiny: TinyModel) -> contextlib.AbstractContextManager:
    """``torch._dynamo.config.patch`` with the model's tracing needs (a no-op for most)."""
    return torch._dynamo.config.patch(**tiny.spec.dynamo_config)
