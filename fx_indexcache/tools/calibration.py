"""Calibration targets for the pattern tools: a model, its calibration batches, how to call it.

``overlap`` and ``pattern_search`` share them: by default the trained checkpoint shipped in the package
(``reference.checkpoint``) on windows of its calibration files (``reference.corpus``); ``--random-weights``
gives the random-weight reference model on random tokens, ``--hf-model`` a tiny transformers DSA model.
The model is compiled once with an ``IndexProbe``.
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


TRAINED_SEQ_LEN = 256  # bytes per calibration window for the shipped checkpoint (its top-k is 64, context 1024)
RANDOM_SEQ_LEN = 48  # tokens per sequence for random-weight models (top-k 16)


def add_reference_arguments(parser: argparse.ArgumentParser, layers_help: str) -> None:
    """Which reference model: the shipped checkpoint (default), another checkpoint, or random weights."""
    parser.add_argument("--random-weights", action="store_true",
                        help="the random-weight reference model (tiny MoE) instead of the trained checkpoint")
    parser.add_argument("--checkpoint", default=None,
                        help="a reference-model safetensors checkpoint (default: the one shipped in the package)")
    parser.add_argument("--layers", type=int, default=None,
                        help="DSA layers; of a checkpoint, its first N (they select exactly the keys they select in "
                             f"the whole model). {layers_help}")


def reference_model(args: argparse.Namespace, random_layers: int = 8, dtype: torch.dtype = torch.float32):
    """The model ``add_reference_arguments`` asked for: the loaded checkpoint, or random weights."""
    from ..models.reference import DSAModelConfig, ReferenceDSAModel
    from ..models.reference.checkpoint import load_checkpoint

    if args.random_weights:
        if args.checkpoint:
            raise SystemExit("--random-weights and --checkpoint exclude each other")
        config = DSAModelConfig.tiny(num_layers=args.layers or random_layers)
        return ReferenceDSAModel(config, seed=getattr(args, "seed", 0), dtype=dtype)
    return load_checkpoint(args.checkpoint, num_layers=args.layers, dtype=dtype)


def calibration_windows(seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` byte windows at seeded random offsets of the calibration files (``reference.corpus``)."""
    from ..models.reference import corpus

    tokens = corpus.as_tokens(corpus.read_files(corpus.CALIBRATION_FILES))
    return corpus.random_windows(tokens, seq_len, count, torch.Generator().manual_seed(seed))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    add_reference_arguments(parser, "Default: the whole checkpoint, or 8 with --random-weights")
    parser.add_argument("--hf-model", default=None, help="a tiny transformers DSA model from models.tiny_transformers.TINY_DSA_MODELS")
    parser.add_argument("--batches", type=int, default=2, help="calibration batches (default 2)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens per sequence (default {TRAINED_SEQ_LEN} for the trained checkpoint, top-k 64; "
                             f"{RANDOM_SEQ_LEN} otherwise, top-k 16)")
    parser.add_argument("--seed", type=int, default=0, help="weights and calibration tokens (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: fastest for tiny models on a shared CPU; 0 keeps torch's)")


def build_target(args: argparse.Namespace) -> ProbeTarget:
    """The trained checkpoint on calibration text (default), random weights on random tokens, or ``--hf-model``."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.hf_model:
        args.seq_len = args.seq_len or RANDOM_SEQ_LEN
        try:
            from ..models import tiny_transformers
        except ImportError as error:  # transformers missing
            raise SystemExit(f"--hf-model needs transformers and fx_indexcache.models.tiny_transformers: {error}") from error
        if args.hf_model not in tiny_transformers.TINY_DSA_MODELS:
            raise SystemExit(f"--hf-model {args.hf_model!r}: choose from {sorted(tiny_transformers.TINY_DSA_MODELS)}")
        tiny = tiny_transformers.TINY_DSA_MODELS[args.hf_model](seed=args.seed)
        batches = [tiny.make_inputs(args.seq_len, seed=args.seed + i, batch=args.batch_size) for i in range(args.batches)]

        def call_hf(fn, batch):
            return tiny_transformers.output_of(fn(**batch, use_cache=False), tiny.spec)

        return ProbeTarget(
            args.hf_model, tiny.model, tiny.num_layers, batches, call_hf,
            is_logits=tiny.spec.output == "logits", context=lambda: tiny_transformers.dynamo_config(tiny),
        )
    model = reference_model(args)
    config = model.config
    if args.random_weights:
        args.seq_len = args.seq_len or RANDOM_SEQ_LEN
        generator = torch.Generator().manual_seed(args.seed)
        batches = [
            torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
            for _ in range(args.batches)
        ]
        name = f"reference, random weights ({config.num_layers} layers)"
    else:
        args.seq_len = args.seq_len or TRAINED_SEQ_LEN
        windows = calibration_windows(args.seq_len, args.batches * args.batch_size, args.seed)
        batches = list(windows.split(args.batch_size))
        name = f"trained reference ({config.num_layers} layers, top-{config.index_topk})"
    return ProbeTarget(name, model, config.num_layers, batches, lambda fn, ids: fn(ids))


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
