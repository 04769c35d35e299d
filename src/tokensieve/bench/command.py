"""`tokensieve bench`: speed and memory of methods against `transformers` and our dense path, with the ideal."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..methods import METHODS, split_methods
from .modes import MODES


def register(sub) -> None:
    from ..commands.options import add_model_arguments, positive_int

    parser = sub.add_parser(
        "bench",
        help="time methods against transformers and our dense path (TTFT, TPOT, multi-turn, memory) beside the ideal",
    )
    add_model_arguments(parser, default_model="cpu-prefill")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="e2e",
        help="e2e: whole generations; ttft: prefill only; decode: TPOT after an untimed prefill; "
        "multi-turn: session.extend vs recomputing each turn; memory: peak memory of a prefill, chunked or not; "
        "batch: decode throughput at the --batch sizes (continuous batching vs transformers' batched generate)",
    )
    parser.add_argument("--batch", default="1,4", help="batch: comma-separated batch sizes, e.g. 1,4,16")
    parser.add_argument(
        "--shared-prompt",
        action="store_true",
        help="batch: every sequence continues one prefilled prompt (forked sessions): one prefill per contestant",
    )
    parser.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated methods or specs like 'omnikv(budget=256)' or 'sliminfer+omnikv', or 'all' "
        f"(registered: {', '.join(sorted(METHODS))}); "
        "transformers and our dense path always run",
    )
    parser.add_argument("--lengths", default="4k", help="comma-separated context lengths in tokens, e.g. 4k,8k,16384")
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="tokens generated per run (e2e: default 32, >= 2), decode steps per round (decode: 16), "
        "answer tokens per turn (multi-turn: 16)",
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs (decode: rounds) per setting")
    parser.add_argument("--turns", type=positive_int, default=4, help="multi-turn: turns of the conversation")
    parser.add_argument("--document", default=None, help="multi-turn: a text file or JSON {'text': ...} to talk about")
    parser.add_argument("--out", default="results/bench", help="folder for the JSON results and the plots")
    parser.add_argument("--accuracy", default=None, help="eval results JSON, to plot accuracy vs speedup (e2e)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def parse_lengths(text: str) -> list[int]:
    """`"4k,8k,16384"` as `[4096, 8192, 16384]` (k = 1024)."""
    lengths = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            value = int(item[:-1]) * 1024 if item.endswith("k") else int(item)
        except ValueError:
            raise ValueError(f"bad context length {item!r}: give token counts like 4096 or 4k") from None
        if value <= 0:
            raise ValueError(f"context lengths must be > 0, got {item!r}")
        lengths.append(value)
    return sorted(set(lengths))


def load_engine(args: argparse.Namespace):
    """The engine for `--model` and the shared model options."""
    from ..commands.options import load_engine

    return load_engine(args)


def run(args: argparse.Namespace) -> None:
    from ..commands.options import check_context
    from . import modes, report, runner

    methods, lengths = split_methods(args.methods), parse_lengths(args.lengths)
    runner.contestants(methods)  # unknown names fail before the model loads
    modes.check(args)
    check_context(args.model, max(lengths), "--lengths", modes.new_tokens(args))
    accuracy = report.load_accuracy(Path(args.accuracy)) if args.accuracy else None
    path, text = modes.run(args, methods, lengths, load_engine)
    print(text)
    written = [path]
    if args.tensor_parallel_size == 1 and args.mode in ("e2e", "batch"):
        written += _plots(path, accuracy, args.accuracy)
    print("\nwrote " + ", ".join(str(p) for p in written))


def _plots(path: Path, accuracy: dict[str, float] | None, accuracy_file: str | None) -> list[Path]:
    import json

    from . import plots, runner

    document = json.loads(path.read_text())
    rows = document["results"]
    written = []
    try:
        if document["config"]["mode"] == "batch":
            plots.plot_batch(rows, path.parent / "batch.png")
            return [path.parent / "batch.png"]
        plots.plot_speedups(rows, path.parent / "speedup.png")
        written.append(path.parent / "speedup.png")
        if accuracy is not None:
            drawn = plots.plot_accuracy(rows, accuracy, path.parent / "accuracy_vs_speedup.png")
            written.append(path.parent / "accuracy_vs_speedup.png")
            missing = sorted({r["method"] for r in rows} - set(drawn) - {runner.TRANSFORMERS})
            if missing:
                print(f"no accuracy in {accuracy_file} for: {', '.join(missing)}")
    except ImportError:
        print("matplotlib is not installed (pip install 'tokensieve[plot]'): no plots written")
    return written
