"""What every command shares: the model options, their checks before loading, the help format, the stats table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless its help already says it, it has none, or it is a flag."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """The parser of every subcommand: `HelpFormatter` unless a command asks for another."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (bools and signs refused by construction: digits only)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return int(text)


def add_haystack_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """`--haystack`, the filler text of needle prompts (eval, demo, calibrate-pruning); `note` ends its help."""
    parser.add_argument(
        "--haystack",
        default=None,
        help="haystack text around the needles: a .txt/.md file, a JSON {'text': ...} file (e.g. RULER's Paul "
        f"Graham essays) or a directory of text files (default: built-in procedural prose{note})",
    )


def haystack_of(args: argparse.Namespace):
    """The `--haystack` given, read (`eval.haystack.Haystack`), or None for the procedural prose."""
    from ..eval.haystack import Haystack

    return Haystack.from_file(args.haystack) if args.haystack else None


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """The model, device, dtype and CPU-thread options every command shares."""
    parser.add_argument(
        "--model",
        default=default_model,
        required=default_model is None,
        help="a Hugging Face checkpoint directory, a .gguf file, 'smollm2' or 'testbed' (embedded models), "
        "or a preset name (random weights)",
    )
    parser.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: torch's own; 1 gives steadier timings on a busy machine)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=positive_int,
        default=None,
        help="run each layer's prompt rows N at a time (flat peak memory, the same decisions; default: all at once)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        help="split the heads and the MLP over N ranks (worker processes started here; on CUDA one device each; "
        "under torchrun, its ranks); see docs/distributed.md",
    )
    parser.add_argument(
        "--method-defaults",
        default=None,
        help="what bare method names stand for with this model: a JSON file ({'method_defaults': {'lazyllm': "
        "'lazyllm(...)'}}, or a pruning.json of calibrate-pruning: its recommendations), or 'none' for the "
        "papers' defaults (default: the model's own: smollm2's measured schedules, or tokensieve.json in a "
        "checkpoint directory)",
    )


def check_model_arguments(args: argparse.Namespace) -> None:
    """`--device` and `--dtype` checked before anything loads (a wrong one would otherwise show after it)."""
    from ..loading import resolve_device, resolve_dtype

    resolve_dtype(args.dtype, resolve_device(args.device))


def known_max_positions(model: str) -> int | None:
    """The positions of `--model` read without loading it: a preset's, or a directory's config.json; else None."""
    from .. import presets
    from ..loading import resolve_model_path

    if not Path(model).exists() and model in presets.PRESETS:
        return presets.MAX_POSITIONS
    try:
        config = json.loads((resolve_model_path(model) / "config.json").read_text())
    except (OSError, ValueError):  # e.g. no such directory, or the testbed is not embedded
        return None  # the loader will say what is wrong with it
    return config.get("max_position_embeddings")


def check_context(model: str, tokens: int, option: str, new_tokens: int = 1) -> None:
    """A prompt of `tokens` plus `new_tokens` must fit the positions of `--model` (when known without loading)."""
    limit = known_max_positions(model)
    if limit is not None and tokens + new_tokens > limit:
        raise ValueError(
            f"{option}: {tokens} tokens plus {new_tokens} new exceed the {limit} positions of {model}: "
            f"ask for at most {limit - new_tokens} tokens"
        )


def model_options(args: argparse.Namespace, method: str = "dense") -> dict:
    """The model options of `args` as `loading.load_engine`'s keywords (plain values: JSON can carry them)."""
    return dict(
        model=str(args.model),
        method=method,
        device=args.device,
        dtype=args.dtype,
        threads=getattr(args, "threads", None),
        prefill_chunk=getattr(args, "prefill_chunk", None),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        method_defaults=getattr(args, "method_defaults", None),
    )


def load_engine(args: argparse.Namespace, method: str = "dense"):
    """An engine for `--model`: a checkpoint directory, a .gguf file, an embedded model or a preset name."""
    from ..loading import load_engine

    return load_engine(**model_options(args, method))


def format_stats(stats) -> str:
    """A readable two-column table of a generation's stats."""
    mb = 1 / 2**20
    rows = [
        ("method", ", ".join(f"{k}={v}" for k, v in stats.method.items())),
        ("prompt tokens", stats.prompt_tokens),
        ("new tokens", stats.new_tokens),
        ("TTFT", f"{stats.ttft_s * 1000:.1f} ms"),
        ("TPOT", f"{stats.tpot_s * 1000:.2f} ms"),
        ("prefill tokens per layer", _compact(stats.prefill_tokens_per_layer)),
        ("prefill computed vs dense", f"{stats.prefill_fraction:.1%}"),
        ("decode keys per layer (mean)", _compact([round(x, 1) for x in stats.decode_keys_per_layer])),
        ("KV on device", f"{stats.kv_bytes_device * mb:.2f} MiB"),
        (
            "KV on host",
            f"{stats.kv_bytes_host * mb:.2f} MiB" + (" (the same memory: CPU)" if stats.host_is_device else ""),
        ),
        ("revived tokens", stats.revived_tokens),
        (
            "host -> device per step",
            f"{stats.host_loads_per_step:.2f} copies, {stats.host_rows_loaded_per_step:.1f} rows, "
            f"{stats.host_bytes_loaded_per_step * mb:.3f} MiB",
        ),
    ]
    rows += [(key, value) for key, value in stats.method_stats.items()]
    width = max(len(str(key)) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _compact(values: list) -> str:
    """`[8, 8, 8, 4, 4]` as `8 x3, 4 x2`: runs of equal values, which is how schedules look."""
    runs: list[list] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return ", ".join(f"{v} x{n}" if n > 1 else f"{v}" for v, n in runs)
