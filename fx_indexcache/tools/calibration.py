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
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from .cli import count
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
    parser.add_argument("--layers", type=count, default=None,
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
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a local checkpoint directory (config.json + *.safetensors: a transformers DSA model, or "
                             "the reference model saved by models.reference.hf_directory); needs --calibration")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="calibration data: text (tokenised with the directory's tokenizer; UTF-8 bytes for the "
                             "reference model), or token ids as .jsonl (a JSON list a line), .npy or .pt "
                             "(read without unpickling); cut into --batches x --batch-size windows of --seq-len")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run code the --model directory names (off by default)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32",
                        help="weights dtype (default float32; auto: as stored)")
    parser.add_argument("--device", default="cpu", help="where the model runs (default cpu; e.g. cuda)")
    add_reference_arguments(parser, "Default: the whole checkpoint, or 8 with --random-weights")
    parser.add_argument("--hf-model", default=None, help="a tiny transformers DSA model from models.tiny_transformers.TINY_DSA_MODELS")
    parser.add_argument("--batches", type=count, default=2, help="calibration batches (default 2)")
    parser.add_argument("--batch-size", type=count, default=2)
    parser.add_argument("--seq-len", type=count, default=None,
                        help=f"tokens per sequence (default {TRAINED_SEQ_LEN} for the trained checkpoint, top-k 64; "
                             f"{RANDOM_SEQ_LEN} otherwise, top-k 16)")
    parser.add_argument("--seed", type=int, default=0, help="weights and calibration tokens (default 0)")
    parser.add_argument("--threads", type=count, default=1,
                        help="torch intra-op threads (default 1: fastest for tiny models on a shared CPU; 0 keeps torch's)")


def build_target(args: argparse.Namespace) -> ProbeTarget:
    """The trained checkpoint on calibration text (default), random weights on random tokens, or ``--hf-model``."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if getattr(args, "model", None) or getattr(args, "calibration", None):
        return _file_target(args)
    if args.hf_model:
        args.seq_len = args.seq_len or RANDOM_SEQ_LEN
        if importlib.util.find_spec("transformers") is None:  # the builders import it only when they run
            raise SystemExit(f"--hf-model {args.hf_model!r} builds a model from transformers, which is not installed "
                             "here: pip install 'fx-indexcache[hf]' (or run without --hf-model: the built-in model)")
        from ..models import tiny_transformers
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


def _file_target(args: argparse.Namespace) -> ProbeTarget:
    """``--model DIR`` and/or ``--calibration FILE`` (without ``--model``: the built-in checkpoint on the file)."""
    from .model_source import calibration_batches, load_model_directory
    from ..context import layer_count_of
    from .pattern_choice import _Caller, _check_batches

    if args.model and (args.hf_model or args.random_weights or args.checkpoint):
        raise SystemExit("--model excludes --hf-model, --random-weights and --checkpoint")
    if args.model and args.layers is not None:
        raise SystemExit("--layers applies to the built-in checkpoint; with --model, save the layers you want")
    if not args.calibration:
        raise SystemExit(f"--model {args.model}: give --calibration FILE (text or token ids) to calibrate on")
    try:
        if args.model:
            loaded = load_model_directory(args.model, dtype=args.dtype, device=args.device,
                                          trust_remote_code=args.trust_remote_code)
            model, name, topk = loaded.model, loaded.description, loaded.index_topk
        else:
            if args.hf_model:
                raise SystemExit("--calibration applies to --model or the built-in checkpoint, not --hf-model")
            dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
            model = reference_model(args, dtype=dtype).to(args.device)
            loaded, topk = None, model.config.index_topk
            name = f"{'random-weight' if args.random_weights else 'trained'} reference ({model.config.num_layers} layers)"
        args.seq_len = args.seq_len or max(TRAINED_SEQ_LEN, 2 * (topk or 0))
        if topk is not None and args.seq_len <= topk:
            print(f"note: --seq-len {args.seq_len} <= top-k {topk}: every query sees fewer than k keys, so every "
                  "layer selects all of them and no pattern changes the output; use a longer --seq-len")
        batches = calibration_batches(args.calibration, loaded, seq_len=args.seq_len, batch_size=args.batch_size,
                                      batches=args.batches)
        batches = _check_batches(model, [batch.to(args.device) for batch in batches])
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    name += f", {len(batches)} batches of {tuple(batches[0].shape)} tokens from {args.calibration}"
    return ProbeTarget(name, model, layer_count_of(getattr(model, "config", None)) or 0, batches, _Caller(model))


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
