"""`tokensieve.load`: a Hugging Face checkpoint directory or a loaded model, to an `Engine`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .engine import Engine
from .methods import Method
from .model import DecoderModel, check_supported
from .models.families import hf_attention_implementation

TESTBED = "testbed"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def load(
    model: str | Path | nn.Module,
    *,
    tokenizer=None,
    method: str | Method = "dense",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    prefill_chunk: int | None = None,
) -> Engine:
    """An engine for `model`: a local Hugging Face checkpoint directory or an already loaded model.

    `device` defaults to CUDA when available, else CPU; `dtype` to float32 on CPU and bfloat16 on CUDA.
    `"testbed"` names the small model embedded in the package. Nothing is downloaded: a directory must
    hold `config.json`, the weights and (unless `tokenizer` is given) the tokenizer files.
    `prefill_chunk=N` runs each layer's rows through attention and the MLP N at a time (flat peak memory).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if isinstance(model, nn.Module):
        hf_model = model.to(device=device, dtype=dtype)
        source = getattr(model, "name_or_path", "")
    else:
        source = str(resolve_model_path(model))
        hf_model = _load_checkpoint(Path(source), device, dtype)
    if tokenizer is None:
        tokenizer = _load_tokenizer(source)
    return Engine(DecoderModel(hf_model), tokenizer, method, prefill_chunk=prefill_chunk)


def resolve_model_path(model: str | Path) -> Path:
    """A checkpoint directory; `"testbed"` (unless a directory of that name exists) is the embedded model."""
    if str(model) == TESTBED and not Path(model).exists():
        from .testbed import model_path

        try:
            return model_path()
        except FileNotFoundError as err:
            raise ValueError(str(err)) from err
    return Path(model)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available here; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}: tokensieve runs on 'cpu' and 'cuda'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def _load_checkpoint(path: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory (no config.json there)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_supported(config, where=f" in {path}")
    hf_model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=hf_attention_implementation(config), local_files_only=True
    )
    return hf_model.to(device)


def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    if not source or not Path(source).is_dir():
        raise ValueError("no tokenizer: pass tokenizer=... (the model was not loaded from a local directory)")
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from {source}: pass tokenizer=... ({err})") from err
