"""tokensieve: long-context inference that computes only the tokens that matter.

Runs Hugging Face decoders (Llama, Mistral, Qwen2) with dynamic token pruning and context selection
(SlimInfer, LazyLLM, OmniKV, and the StreamingLLM, SnapKV and H2O baselines) and shows what each method
computed, how fast it was and how close it stayed to dense. Nothing is downloaded: --model is a local
checkpoint directory, 'testbed' (a small model embedded in the package) or a preset name (random weights).

examples:
  tokensieve demo                                   every method on a needle task, beside dense
  tokensieve generate --model testbed --prompt "The key is" --method sliminfer --stats
  tokensieve eval --methods dense,omnikv --lengths 2k,4k
  tokensieve bench --model cpu-prefill --methods sliminfer,lazyllm --lengths 4k
  tokensieve calibrate-pruning --model smollm2 --chat --haystack essays.json   SlimInfer/LazyLLM schedules

`tokensieve COMMAND --help` lists a command's options with their defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class _TopLevelFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (its examples are laid out by hand)."""


def _commands() -> list[Callable]:
    from .bench import command as bench
    from .commands import calibrate, calibrate_pruning, demo, generate, serve
    from .commands import eval as evaluation

    return [
        generate.register,
        demo.register,
        bench.register,
        evaluation.register,
        calibrate.register,
        calibrate_pruning.register,
        serve.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    from .commands.options import CommandParser

    parser = argparse.ArgumentParser(prog="tokensieve", description=__doc__, formatter_class=_TopLevelFormatter)
    sub = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for register in _commands():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .commands.options import check_model_arguments

    args = build_parser().parse_args(argv)
    try:
        check_model_arguments(args)
        args.run(args)
    except (ValueError, TypeError, OSError) as err:
        print(f"tokensieve: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
