"""Command line: `tokensieve generate | demo | ...`. Each subcommand is a `register(subparsers)` function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .methods import METHODS


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return int(text)


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """The model, device, dtype and CPU-thread options every command shares."""
    parser.add_argument(
        "--model",
        default=default_model,
        required=default_model is None,
        help="a Hugging Face checkpoint directory, 'testbed' (the embedded model) or a preset name (random weights)",
    )
    parser.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's own; 1 gives steadier timings on a busy machine)",
    )


def load_engine(args: argparse.Namespace, method: str = "dense"):
    """An engine for `--model`: a checkpoint directory, or a preset name from `tokensieve.presets`."""
    from pathlib import Path

    import torch

    from . import load, presets

    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    if not Path(args.model).exists() and args.model in presets.PRESETS:
        model, tokenizer = presets.build(args.model)
        return load(model, tokenizer=tokenizer, method=method, device=args.device, dtype=args.dtype)
    return load(args.model, method=method, device=args.device, dtype=args.dtype)


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
        ("KV on host", f"{stats.kv_bytes_host * mb:.2f} MiB"),
        ("revived tokens", stats.revived_tokens),
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


def register_generate(sub) -> None:
    parser = sub.add_parser("generate", help="generate text after a prompt with a method")
    add_model_arguments(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="a file holding the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--method",
        default="dense",
        help=f"a method name ({', '.join(sorted(METHODS))}) or a spec "
        "with settings, e.g. 'omnikv(budget=256, offload=False)'",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    parser.add_argument("--stats", action="store_true", help="print the generation's stats after the text")
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    from pathlib import Path

    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    engine = load_engine(args, method=args.method)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
    )
    pieces = engine.stream(prompt, **options)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    if args.stats:
        print(format_stats(pieces.generation.stats))


def _commands() -> list[Callable]:
    from . import calibrate, demo
    from .bench import command as bench
    from .eval import command as evaluation

    return [register_generate, demo.register, bench.register, evaluation.register, calibrate.register]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokensieve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _commands():
        register(sub)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"tokensieve: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
