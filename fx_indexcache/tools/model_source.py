"""What ``overlap`` / ``search --model DIR --calibration FILE`` read: a local checkpoint directory and calibration tokens.

Nothing a user points at runs code. A directory is ``config.json`` + safetensors weights: transformers loads it with
``trust_remote_code`` off unless asked and ``use_safetensors=True`` (pickled ``.bin`` weights are refused), and the
built-in reference model's directories (``models.reference.hf_directory``) load without transformers at all. Token
ids come from ``.jsonl`` (JSON, one sequence a line), ``.npy`` (``numpy.load(allow_pickle=False)``) or ``.pt``
(``torch.load(weights_only=True)``); any other file is text, tokenised with the directory's tokenizer (or as UTF-8
bytes for a byte-level model). A file that cannot be read is named in the error, with the line or field at fault.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

#: Config keys that mark a DeepSeek-Sparse-Attention lightning indexer (in the config or its text_config).
DSA_CONFIG_KEYS = ("index_topk", "index_n_heads", "index_head_dim")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class LoadedModel:
    """A model read from a directory, with how to turn text into its tokens."""

    model: torch.nn.Module
    path: Path
    config: dict  # config.json as read
    tokenizer: Any = None  # a transformers tokenizer, or None
    byte_level: bool = False  # text is tokenised as UTF-8 bytes (the reference model)

    @property
    def index_topk(self) -> int | None:
        for source in (self.config, self.config.get("text_config") or {}):
            value = source.get("index_topk")
            if isinstance(value, int):
                return value
        return None

    @property
    def description(self) -> str:
        model_type = self.config.get("model_type", "?")
        return f"{type(self.model).__name__} from {self.path} (model_type {model_type})"


def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not path.is_dir():
        raise ValueError(f"--model {path}: not a directory (expected a local checkpoint directory: config.json + "
                         "*.safetensors)")
    if not config_path.is_file():
        raise ValueError(f"--model {path}: no config.json in the directory (looked for {config_path})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error}); truncated?") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def _check_dsa(config: dict, path: Path) -> None:
    sources = [config, config.get("text_config") or {}]
    if not any(key in source for source in sources for key in DSA_CONFIG_KEYS):
        raise ValueError(
            f"--model {path}: not a DeepSeek-Sparse-Attention model: config.json (model_type "
            f"{config.get('model_type')!r}) has none of {list(DSA_CONFIG_KEYS)} in the config or its text_config, "
            "the keys of a DSA lightning indexer"
        )


def _check_weights(path: Path) -> None:
    """Safetensors weights present and each file's header readable (a truncated file is named here)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        extra = f" (found {pickled}: pickled weights are not loaded; convert them to safetensors)" if pickled else ""
        raise ValueError(f"--model {path}: no *.safetensors weights in the directory{extra}")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                names = list(handle.keys())
                if names:
                    handle.get_slice(names[-1])
        except Exception as error:  # safetensors' own error types (bad header, incomplete buffer)
            raise ValueError(f"{file}: not a readable safetensors file ({error}); truncated or corrupted?") from error
        size = file.stat().st_size
        with file.open("rb") as raw:
            header_length = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(header_length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        if 8 + header_length + end > size:
            raise ValueError(f"{file}: truncated: its header describes {8 + header_length + end} bytes, the file "
                             f"has {size}")


def load_model_directory(path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                         trust_remote_code: bool = False) -> LoadedModel:
    """The model in local directory ``path``, in eval mode, in ``dtype`` (``"auto"``: as stored), on ``device``."""
    from ..models.reference import hf_directory

    path = Path(path)
    config = read_config(path)
    _check_dsa(config, path)
    _check_weights(path)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not allowed; choose from {sorted(DTYPES)} or 'auto'")
    if hf_directory.is_reference_config(config):
        torch_dtype = DTYPES.get(config.get("torch_dtype"), torch.float32) if dtype == "auto" else DTYPES[dtype]
        model = hf_directory.load_directory(path, config, dtype=torch_dtype, device=device)
        return LoadedModel(model, path, config, None, byte_level=config.get("tokenizer") == hf_directory.BYTE_TOKENIZER)
    return _load_transformers(path, config, dtype, device, trust_remote_code)


def _load_transformers(path: Path, config: dict, dtype: str, device: str, trust_remote_code: bool) -> LoadedModel:
    try:
        import transformers
    except ImportError as error:
        raise ValueError(f"--model {path}: a transformers checkpoint needs transformers (pip install "
                         f"'fx-indexcache[hf]'): {error}") from error
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=True)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(path), **kwargs)
    except ValueError as error:
        hint = ""
        if config.get("auto_map") and not trust_remote_code:
            hint = (" (config.json names its own code in auto_map; pass --trust-remote-code to run it, only for a "
                    "directory you trust)")
        raise ValueError(f"--model {path}: transformers cannot read config.json{hint}: {error}") from error
    model_kwargs = dict(kwargs, config=hf_config, use_safetensors=True,
                        dtype="auto" if dtype == "auto" else DTYPES[dtype])
    model = None
    errors = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            model = auto.from_pretrained(str(path), **model_kwargs)
            break
        except ValueError as error:  # no mapping of this config to the auto class: try the next
            errors.append(f"{auto.__name__}: {error}")
        except OSError as error:
            raise ValueError(f"--model {path}: weights could not be loaded ({error})") from error
    if model is None:
        raise ValueError(f"--model {path}: no transformers model class for model_type "
                         f"{config.get('model_type')!r}: " + "; ".join(errors))
    model = model.to(device).eval()
    tokenizer = None
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
    return LoadedModel(model, path, config, tokenizer)


# ---------------------------------------------------------------------------------------------- calibration


def read_token_file(path: str | Path) -> list[torch.Tensor]:
    """Sequences of token ids (1-D int64 tensors) from a ``.jsonl``, ``.npy`` or ``.pt`` file, without unpickling."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--calibration {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".npy":
        import numpy

        try:
            array = numpy.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"--calibration {path}: not a readable .npy array of token ids ({error}); "
                             "truncated, or an object array (which would need unpickling)?") from error
        return _rows(torch.from_numpy(numpy.ascontiguousarray(array)), path)
    if suffix == ".pt":
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # weights_only refusals and truncated zip archives raise several types
            raise ValueError(f"--calibration {path}: not a readable tensor file ({type(error).__name__}: {error}); "
                             "truncated, or holding objects other than tensors?") from error
        if isinstance(value, dict):
            if "input_ids" not in value:
                raise ValueError(f"--calibration {path}: a dict without 'input_ids' (keys {sorted(map(str, value))})")
            value = value["input_ids"]
        if isinstance(value, (list, tuple)):
            return [seq for item in value for seq in _rows(torch.as_tensor(item), path)]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"--calibration {path}: holds a {type(value).__name__}, expected a tensor of token ids")
        return _rows(value, path)
    raise ValueError(f"--calibration {path}: not a token-id file (.jsonl, .npy, .pt)")


def _rows(tensor: torch.Tensor, path: Path) -> list[torch.Tensor]:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"--calibration {path}: token ids must be integers, got {tensor.dtype}")
    if tensor.dim() == 1:
        return [tensor.to(torch.int64)]
    if tensor.dim() == 2:
        return list(tensor.to(torch.int64))
    raise ValueError(f"--calibration {path}: token ids must be [tokens] or [sequences, tokens], got shape "
                     f"{tuple(tensor.shape)}")


def _read_jsonl(path: Path) -> list[torch.Tensor]:
    sequences = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"--calibration {path}, line {number}: not JSON ({error}); truncated?") from error
            if isinstance(value, dict):
                value = value.get("input_ids")
            if (not isinstance(value, list) or not value
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"--calibration {path}, line {number}: expected a non-empty JSON list of integer "
                                 'token ids, or {"input_ids": [...]}')
            sequences.append(torch.tensor(value, dtype=torch.int64))
    if not sequences:
        raise ValueError(f"--calibration {path}: no sequences in the file")
    return sequences


def read_text_tokens(path: str | Path, loaded: LoadedModel | None) -> torch.Tensor:
    """A text file as one token stream: the directory's tokenizer, or UTF-8 bytes for a byte-level model."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--calibration {path}: no such file")
    data = path.read_bytes()
    if loaded is None or loaded.byte_level:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    if loaded.tokenizer is None:
        raise ValueError(f"--calibration {path}: a text file, but {loaded.path} has no tokenizer (looked for "
                         f"{list(TOKENIZER_FILES)}); give token ids as .jsonl, .npy or .pt instead")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--calibration {path}: not UTF-8 text ({error}); token-id files end in .jsonl/.npy/.pt") from error
    return torch.tensor(loaded.tokenizer(text)["input_ids"], dtype=torch.int64)


def calibration_batches(path: str | Path, loaded: LoadedModel | None, *, seq_len: int, batch_size: int,
                        batches: int) -> list[torch.Tensor]:
    """At most ``batches`` batches of ``batch_size`` sequences of ``seq_len`` tokens from ``path``.

    A token stream (text, a 1-D array) is cut into consecutive windows; sequences given one per row are cut to
    ``seq_len`` and those shorter are left out (a batch holds equal lengths).
    """
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".npy", ".pt"):
        sequences = read_token_file(path)
    else:
        sequences = [read_text_tokens(path, loaded)]
    if len(sequences) == 1:  # one stream: consecutive windows
        usable = sequences[0].numel() // seq_len
        windows = list(sequences[0][: usable * seq_len].view(usable, seq_len))
    else:
        windows = [sequence[:seq_len] for sequence in sequences if sequence.numel() >= seq_len]
    longest = max(s.numel() for s in sequences)
    if not windows:
        raise ValueError(f"--calibration {path}: no sequence holds --seq-len {seq_len} tokens (longest {longest})")
    windows = windows[: batch_size * batches]
    return list(torch.stack(windows).split(batch_size))
