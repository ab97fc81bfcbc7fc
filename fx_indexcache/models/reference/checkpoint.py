"""Save and load ``ReferenceDSAModel`` weights as safetensors, with the config and a checksum in the metadata.

The package ships one trained checkpoint (``DEFAULT_CHECKPOINT``, made by ``scripts/train_reference.py``):
the default model of ``demo``, ``overlap`` and ``search``. Loading checks everything it can before a
weight is used -- the format tag, the config, each tensor's name and shape, and a SHA-256 over the tensor
bytes -- and raises ``ValueError`` naming the file, the field and what was expected, so a corrupted or
mismatched file never runs as a silently wrong model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from importlib import resources
from pathlib import Path

import torch

from .model import DSAModelConfig, ReferenceDSAModel

FORMAT = "fx_indexcache.reference.v1"
DEFAULT_CHECKPOINT_NAME = "dsa_bytes_16l.safetensors"


def default_checkpoint() -> Path:
    """The checkpoint shipped inside the package (``fx_indexcache/models/reference/weights/``)."""
    return Path(str(resources.files("fx_indexcache.models.reference") / "weights" / DEFAULT_CHECKPOINT_NAME))


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    model: ReferenceDSAModel,
    path: str | Path,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write the model's weights (cast to ``dtype``), its config and ``metadata`` (str -> str) to ``path``."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to(dtype).contiguous().cpu() for name, t in model.state_dict().items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=FORMAT, config=json.dumps(model.config.to_dict(), sort_keys=True),
                tensors_sha256=tensors_digest(tensors))
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The checkpoint's metadata, after checking that the file is a safetensors file of this format."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise ValueError(f"checkpoint {path} is not a readable safetensors file: {error}") from error
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r} (a "
                         "reference-model checkpoint; a transformers checkpoint directory, config.json + safetensors, "
                         "is read by `fx-indexcache overlap|search --model DIR`)")
    return meta


def config_from_metadata(meta: dict[str, str], path: Path) -> DSAModelConfig:
    try:
        raw = json.loads(meta.get("config", ""))
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint {path}: metadata 'config' is not JSON ({error})") from error
    if not isinstance(raw, dict):
        raise ValueError(f"checkpoint {path}: metadata 'config' must be a JSON object of DSAModelConfig fields")
    known = {f.name for f in fields(DSAModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"checkpoint {path}: metadata 'config' has unknown fields {unknown}; fields are {sorted(known)}")
    try:
        return DSAModelConfig(**raw)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {path}: metadata 'config' is invalid: {error}") from error


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: tensors do not match its config: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"checkpoint {path}: tensor {name!r} has shape {tuple(got.shape)}, "
                             f"expected {tuple(want.shape)} from its config")
        if not got.is_floating_point():
            raise ValueError(f"checkpoint {path}: tensor {name!r} has dtype {got.dtype}, expected a floating dtype")


def load_checkpoint(
    path: str | Path | None = None,
    *,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ReferenceDSAModel:
    """The model stored at ``path`` (default: the shipped checkpoint), in eval mode, weights cast to ``dtype``.

    ``num_layers`` keeps only the first that many decoder layers (and the final norm and head): every kept
    layer selects exactly the keys it selects in the whole model, since later layers never feed earlier ones.
    """
    from safetensors.torch import load_file

    path = default_checkpoint() if path is None else Path(path)
    meta = read_metadata(path)
    config = config_from_metadata(meta, path)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise ValueError(f"checkpoint {path}: tensor data unreadable ({error})") from error
    if tensors_digest(tensors) != meta.get("tensors_sha256"):
        raise ValueError(f"checkpoint {path}: tensor bytes do not match metadata 'tensors_sha256' (file corrupted?)")
    model = ReferenceDSAModel(config, dtype=dtype, device=device)
    _check_tensors(tensors, model.state_dict(), path)
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= config.num_layers:
            raise ValueError(f"num_layers={num_layers!r} is invalid: allowed are 1 .. {config.num_layers} (the checkpoint's)")
        config = config.replace(num_layers=num_layers,
                                first_k_dense_layers=min(config.first_k_dense_layers, num_layers))
        model = ReferenceDSAModel(config, dtype=dtype, device=device)
        tensors = {name: t for name, t in tensors.items() if name in model.state_dict()}
    model.load_state_dict({name: t.to(dtype) for name, t in tensors.items()})
    model.checkpoint_metadata = dict(meta)  # what training recorded; 'config' is the stored (whole) model's
    return model.eval()
