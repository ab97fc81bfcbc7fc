"""The reference model as a transformers-style directory: ``config.json`` + ``model.safetensors``.

So that the tools take the built-in model the way they take any checkpoint (``fx-indexcache search --model DIR``),
it can be written as a directory a transformers user recognises: ``config.json`` carries ``model_type``
``"fx_indexcache_reference_dsa"``, ``architectures: ["ReferenceDSAModel"]``, the engines' ``num_hidden_layers``
and every ``DSAModelConfig`` field; ``model.safetensors`` the state dict under the model's own parameter names.
Loading is keyed on ``model_type`` and runs no code from the directory (transformers does not know the type, so
``trust_remote_code`` never comes into it). The model reads bytes: ``config.json``'s ``"tokenizer": "utf-8 bytes"``
tells the tools to tokenise calibration text as its UTF-8 bytes.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

from .model import DSAModelConfig, ReferenceDSAModel

MODEL_TYPE = "fx_indexcache_reference_dsa"
ARCHITECTURE = "ReferenceDSAModel"
BYTE_TOKENIZER = "utf-8 bytes"
WEIGHTS_NAME = "model.safetensors"


def save_directory(model: ReferenceDSAModel, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` to directory ``path`` (created) as ``config.json`` + ``model.safetensors``.

    ``dtype``: the stored weights' dtype (default: the model's own)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(dtype or t.dtype).contiguous().cpu() for name, t in model.state_dict().items()}
    stored = next(iter(tensors.values())).dtype
    config = {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "num_hidden_layers": model.config.num_layers,  # the key vLLM, SGLang and IndexCacheBackend.from_config read
        "tokenizer": BYTE_TOKENIZER,
        "torch_dtype": str(stored).removeprefix("torch."),
        **model.config.to_dict(),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    return path


def is_reference_config(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE


def config_from_json(config: dict, source: str) -> DSAModelConfig:
    """The ``DSAModelConfig`` a reference ``config.json`` describes (``num_hidden_layers`` must equal ``num_layers``)."""
    known = {f.name for f in fields(DSAModelConfig)}
    values = {key: value for key, value in config.items() if key in known}
    layers = config.get("num_hidden_layers", values.get("num_layers"))
    if "num_layers" in values and layers != values["num_layers"]:
        raise ValueError(f"{source}: num_hidden_layers={layers!r} and num_layers={values['num_layers']!r} disagree")
    values.setdefault("num_layers", layers)
    try:
        return DSAModelConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error


def load_directory(path: str | Path, config: dict, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> ReferenceDSAModel:
    """The reference model in ``path`` (``config`` is its parsed ``config.json``), weights checked by name and shape."""
    from safetensors.torch import load_file

    from .checkpoint import _check_tensors

    path = Path(path)
    model_config = config_from_json(config, f"{path / 'config.json'}")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} beside config.json (model_type {MODEL_TYPE!r})")
    try:
        tensors = load_file(str(weights))
    except Exception as error:  # safetensors raises its own types for a bad or truncated file
        raise ValueError(f"{weights}: not a readable safetensors file ({error})") from error
    model = ReferenceDSAModel(model_config, dtype=dtype, device=device)
    _check_tensors(tensors, model.state_dict(), weights)
    model.load_state_dict({name: t.to(dtype) for name, t in tensors.items()})
    return model.eval()
