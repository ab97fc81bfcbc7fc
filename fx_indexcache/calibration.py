"""Calibration targets for the pattern tools: a model, its calibration batches, how to call it.

``overlap`` and ``pattern_search`` share them: the built-in reference model by default, or a tiny
transformers DSA model (``--hf-model``), compiled once with an ``IndexProbe``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .probe import IndexProbe, LayerRecord


@dataclasses.dataclass
class ProbeTarget:
    """A model to probe: how to call it on a batch and read the next-token logits."""

    name: str
    model: torch.nn.Module
    num_layers: int  # decoder layers (the pattern string's length)
    batches: list[Any]  # calibration inputs, one per call
    call: Callable[[Callable, Any], torch.Tensor]  # (model or compiled, batch) -> logits [B, S, V]
    is_logits: bool = True  # False: the output is hidden states (score with MSE instead of KL)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=8, help="reference model: DSA layers (default 8)")
    parser.add_argument("--hf-model", default=None, help="a tiny transformers DSA model from hf_models.TINY_DSA_MODELS")
    parser.add_argument("--batches", type=int, default=2, help="calibration batches (default 2)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=48, help="tokens per sequence (default 48, top-k is 16)")
    parser.add_argument("--seed", type=int, default=0, help="weights and calibration tokens (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: fastest for tiny models on a shared CPU; 0 keeps torch's)")


def build_target(args: argparse.Namespace) -> ProbeTarget:
    """The reference model (default) or ``--hf-model NAME``, with random calibration tokens."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.hf_model:
        try:
            from . import hf_models
        except ImportError as error:  # transformers missing
            raise SystemExit(f"--hf-model needs transformers and fx_indexcache.hf_models: {error}") from error
        if args.hf_model not in hf_models.TINY_DSA_MODELS:
            raise SystemExit(f"--hf-model {args.hf_model!r}: choose from {sorted(hf_models.TINY_DSA_MODELS)}")
        tiny = hf_models.TINY_DSA_MODELS[args.hf_model](seed=args.seed)
        batches = [tiny.make_inputs(args.seq_len, seed=args.seed + i, batch=args.batch_size) for i in range(args.batches)]

        def call_hf(fn, batch):
            return hf_models.output_of(fn(**batch, use_cache=False), tiny.spec)

        return ProbeTarget(
            args.hf_model, tiny.model, tiny.num_layers, batches, call_hf,
            is_logits=tiny.spec.output == "logits", context=lambda: hf_models.dynamo_config(tiny),
        )
    from .reference import DSAModelConfig, ReferenceDSAModel

    config = DSAModelConfig.tiny(num_layers=args.layers)
    model = ReferenceDSAModel(config, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        for _ in range(args.batches)
    ]
    return ProbeTarget(f"reference ({args.layers} layers)", model, config.num_layers, batches, lambda fn, ids: fn(ids))


def compile_probe(target: ProbeTarget, switchable: bool = True) -> tuple[IndexProbe, Callable]:
    """The probe backend and the model compiled with it (traced on the first call)."""
    probe = IndexProbe(switchable=switchable)
    compiled = torch.compile(target.model, backend=probe, dynamic=False)
    return probe, compiled


@torch.no_grad()
def record_batches(target: ProbeTarget, probe: IndexProbe, compiled: Callable) -> list[dict[int, LayerRecord]]:
    """Run every calibration batch with all layers F; each batch's per-layer records."""
    out = []
    with target.context(), probe.use(None):
        for batch in target.batches:
            probe.clear()
            target.call(compiled, batch)
            if not probe.records:
                raise RuntimeError(f"{target.name}: no DSA indexer top-k found in the compiled graph(s)")
            out.append(dict(probe.records))
    return out
