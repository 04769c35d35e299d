"""GGUF files to normal checkpoints: dequantized once by `transformers`, then cached and loaded from the cache.

`transformers` reads GGUF files itself (with the optional packages `gguf` and `accelerate`) but marks the loaded
model as quantized, which makes every later load dequantize again (about 20 s for a 135M model on a CPU). So a
GGUF file is converted once into a Hugging Face directory (config without `quantization_config`, safetensors in
the requested dtype, the tokenizer with its chat template) under the cache directory, keyed by the file's path,
size, modification time and dtype; every later load reads that directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from .model import check_supported

GGUF_PACKAGES = ("gguf", "accelerate")
INSTALL_HINT = "pip install gguf==0.19.0 accelerate==1.15.0"


def cache_root() -> Path:
    """`$TOKENSIEVE_CACHE`, else `tokensieve` under the user's cache directory (`$XDG_CACHE_HOME` or ~/.cache)."""
    if os.environ.get("TOKENSIEVE_CACHE"):
        return Path(os.environ["TOKENSIEVE_CACHE"]).expanduser()
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(user_cache) / "tokensieve"


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def gguf_checkpoint(path: str | Path, dtype: torch.dtype) -> Path:
    """The cached checkpoint directory of GGUF file `path` dequantized to `dtype`, converted now if missing."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    target = cache_root() / "gguf" / f"{path.stem}-{_file_key(path, dtype)}"
    if not (target / "config.json").is_file():
        _convert(path, dtype, target)
    return target


def _file_key(path: Path, dtype: torch.dtype) -> str:
    """Changes when the file is replaced or edited (path, size, mtime) or another dtype is asked for."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{digest}-{str(dtype).removeprefix('torch.')}"


def _convert(path: Path, dtype: torch.dtype, target: Path) -> None:
    _require_packages()
    architecture, has_tokenizer = _inspect(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed at the end: an interrupted conversion never looks complete.
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    steps = ["dequantize weights", "write safetensors", "write tokenizer"]
    try:
        with tqdm(total=len(steps), desc=f"converting {path.name} ({architecture}) once", unit="step") as bar:
            bar.set_postfix_str(steps[0])
            model = _dequantized_model(path, dtype)
            bar.update()
            bar.set_postfix_str(steps[1])
            _save_model(model, work)
            bar.update()
            bar.set_postfix_str(steps[2])
            if has_tokenizer:
                _save_tokenizer(path, work)
            bar.update()
        try:
            work.rename(target)
        except OSError:  # another process finished the same conversion first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _require_packages() -> None:
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading a GGUF file needs the packages {', '.join(missing)}: {INSTALL_HINT}")


def _inspect(path: Path) -> tuple[str, bool]:
    """The file's architecture and whether it carries a tokenizer; a clear error if it is corrupt or unsupported."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.get_field("general.architecture")
        architecture = field.contents() if field is not None else None
    except Exception as err:  # the reader fails with whatever numpy hits first in a damaged file
        raise ValueError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); download or convert it again"
        ) from err
    if architecture is None:
        raise ValueError(f"{path} has no 'general.architecture' field: not a model GGUF file")
    # llama.cpp writes Mistral models as 'llama' (transformers maps them back); the other families keep their names.
    check_supported(SimpleNamespace(model_type=architecture), where=f" in {path}")
    return architecture, reader.get_field("tokenizer.ggml.model") is not None


def _dequantized_model(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True
        )
    except (ValueError, KeyError, IndexError) as err:  # tensors that do not fit the file's own metadata
        raise ValueError(f"could not dequantize {path} ({type(err).__name__}: {err}); is the file complete?") from err


def _save_model(model, out: Path) -> None:
    """Config without `quantization_config` and the weights: `save_pretrained` refuses a GGUF-loaded model."""
    from safetensors.torch import save_model

    config = type(model.config).from_dict(
        {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    )
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))  # drops the tied copy of the embedding


def _save_tokenizer(path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as err:  # transformers' converters fail with KeyError/IndexError on fields they miss
        raise ValueError(
            f"could not convert the tokenizer inside {path} ({type(err).__name__}: {err}); "
            "load the model with tokenizer=... instead"
        ) from err
    tokenizer.save_pretrained(out)  # the chat template travels with it
