"""`tokensieve bench`: speed and memory of methods against `transformers` and our dense path, with the ideal."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..methods import METHODS, split_methods


def register(sub) -> None:
    from ..commands.options import add_model_arguments, positive_int

    parser = sub.add_parser(
        "bench",
        help="time methods against transformers and our dense path (TTFT, TPOT, memory) beside the ideal",
    )
    add_model_arguments(parser, default_model="cpu-prefill")
    parser.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated methods or specs like 'omnikv(budget=256)', or 'all' "
        f"(registered: {', '.join(sorted(METHODS))}); "
        "transformers and our dense path always run",
    )
    parser.add_argument("--lengths", default="4k", help="comma-separated context lengths in tokens, e.g. 4k,8k,16384")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (>= 2)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per method and length (medians)")
    parser.add_argument("--out", default="results/bench", help="folder for bench.json and the plots")
    parser.add_argument("--accuracy", default=None, help="eval results JSON, to plot accuracy vs speedup")
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


def run(args: argparse.Namespace) -> None:

    from ..commands.options import check_context, load_engine
    from . import report, runner

    methods, lengths = split_methods(args.methods), parse_lengths(args.lengths)
    runner.contestants(methods)  # unknown names fail before the model loads
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 so that time per output token is defined, got {args.new_tokens}")
    check_context(args.model, max(lengths), "--lengths", args.new_tokens)
    accuracy = report.load_accuracy(Path(args.accuracy)) if args.accuracy else None
    engine = load_engine(args)
    series = runner.measure(
        engine, methods, lengths, new_tokens=args.new_tokens, repeats=args.repeats, progress=not args.no_progress
    )
    rows = report.records(series, engine)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model": args.model,
        "methods": methods,
        "lengths": lengths,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "prompt": "haystack sentences then a question, tokenized to each length",
    }
    report.write_json(out / "bench.json", engine, config, rows)
    print(report.table(rows))
    written = [out / "bench.json"]
    try:
        report.plot_speedups(rows, out / "speedup.png")
        written.append(out / "speedup.png")
        if accuracy is not None:
            drawn = report.plot_accuracy(rows, accuracy, out / "accuracy_vs_speedup.png")
            written.append(out / "accuracy_vs_speedup.png")
            missing = sorted({r["method"] for r in rows} - set(drawn) - {runner.TRANSFORMERS})
            if missing:
                print(f"no accuracy in {args.accuracy} for: {', '.join(missing)}")
    except ImportError:
        print("matplotlib is not installed (pip install 'tokensieve[plot]'): no plots written")
    print("\nwrote " + ", ".join(str(p) for p in written))
