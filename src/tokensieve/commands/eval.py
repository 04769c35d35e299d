"""`tokensieve eval`: the task suite (or LongBench data) x methods x lengths, with a table, JSON, CSV, plot."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    from ..eval.tasks import TASKS, VALUE_KINDS
    from .options import add_haystack_argument, add_model_arguments, positive_int

    parser = sub.add_parser(
        "eval",
        help="accuracy, TTFT and speedup of methods vs dense on long-context tasks",
        description="Run the synthetic task suite (or LongBench data) for every method and length; print a "
        "table and write eval.json and eval.csv (and eval.png with --plot). --model also accepts 'testbed', "
        "the embedded model.",
    )
    add_model_arguments(parser, default_model="testbed")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods: names or specs with settings, e.g. omnikv(budget=256), or 'all' (default)",
    )
    parser.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated tasks among {', '.join(TASKS)} (a needle task takes a value kind: "
        f"niah_single:uuids; kinds: {', '.join(VALUE_KINDS)}) or LongBench task names found in --longbench "
        "(default: every synthetic task, or every LongBench task with --longbench)",
    )
    parser.add_argument(
        "--lengths", default="2k,4k,8k", help="prompt lengths in tokens of the model (default: 2k,4k,8k)"
    )
    parser.add_argument("--samples", type=positive_int, default=5, help="samples per task and length (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples (sample i of a task uses seed + i)")
    parser.add_argument("--depth", type=float, default=None, help="needle depth in [0, 1] (default: random)")
    add_haystack_argument(parser)
    parser.add_argument(
        "--longbench", default=None, help="a directory (or file) of LongBench jsonl / MiniLongBench json"
    )
    parser.add_argument(
        "--ruler",
        default=None,
        help="a RULER jsonl file (fields input, outputs, length) as the task source instead of --tasks: scored by "
        "the fraction of expected outputs found; samples keep their own length (--lengths is not used)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="cap on tokens generated per answer (default: per task)",
    )
    parser.add_argument(
        "--kl", action="store_true", help="also measure KL(dense || method) of next-token distributions (slower)"
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap every prompt in the model's chat template (instruction-tuned models); prompts are sized so "
        "that the templated prompt has the asked length",
    )
    parser.add_argument(
        "--out",
        default="eval-results",
        help="output directory (default: eval-results); eval.records.jsonl there gets each result as it finishes",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from --out's eval.records.jsonl (same options): finished samples are "
        "not run again",
    )
    parser.add_argument("--plot", action="store_true", help="also write eval.png: accuracy vs speedup per method")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from ..eval.longbench import TASK_METRICS, load_longbench
    from ..eval.ruler import load_ruler
    from ..eval.runner import JOURNAL, build_samples, parse_length, require_chat_template, run_eval
    from ..eval.tasks import TASKS, parse_task
    from ..methods import METHODS, resolve_method, split_methods
    from .options import check_context, haystack_of, load_engine

    methods = split_methods(args.methods or "") or list(METHODS)
    for spec in methods:
        resolve_method(spec)  # a clear error now, not after an hour of evaluation
    lengths = sorted({parse_length(x) for x in _split(args.lengths)})
    if not lengths:
        raise ValueError("--lengths is empty: give lengths such as 2k,4k")
    journal = Path(args.out) / JOURNAL
    if args.resume and not journal.is_file():
        raise ValueError(f"--resume: no {journal} to resume from (is --out the interrupted run's directory?)")
    if args.ruler and (args.tasks or args.longbench):
        raise ValueError("--ruler is a task source of its own: drop --tasks and --longbench, or --ruler")
    ruler = load_ruler(args.ruler) if args.ruler else {}
    longbench = load_longbench(args.longbench) if args.longbench else {}
    tasks = _split(args.tasks) or (list(longbench) if longbench else list(TASKS))
    if ruler:
        tasks, lengths = sorted({task for task, _ in ruler}), sorted({length for _, length in ruler})
    for task in tasks:
        if task in TASK_METRICS and task not in longbench:
            where = f"the data in {args.longbench}" if args.longbench else "no --longbench data"
            raise ValueError(f"--tasks {task} is a LongBench task, and {where} holds it: pass --longbench DIR with it")
        if task not in longbench and task not in {t for t, _ in ruler}:
            parse_task(task)  # LongBench and RULER names are checked with their data
    if args.depth is not None and not 0 <= args.depth <= 1:
        raise ValueError(f"--depth must be in [0, 1] (0 = start of the haystack), got {args.depth}")
    check_context(args.model, max(lengths), "--lengths", args.max_new_tokens or 1)
    haystack = haystack_of(args)

    engine = load_engine(args)
    if args.chat:
        require_chat_template(engine.tokenizer)  # now, not after the samples are built
    if ruler:
        suite = {key: samples[: args.samples] for key, samples in ruler.items()}
    else:
        suite = build_samples(
            engine.tokenizer, tasks, lengths, args.samples, args.seed, haystack, args.depth, longbench, chat=args.chat
        )
    config = {
        "model": args.model,
        "tasks": tasks,
        "lengths": lengths,
        "samples": args.samples,
        "seed": args.seed,
        "depth": args.depth,
        "haystack": args.haystack or "procedural",
        "longbench": args.longbench,
        "ruler": args.ruler,
        "dtype": args.dtype,
        "device": args.device,
        "max_new_tokens": args.max_new_tokens,
        "kl": args.kl,
        "chat": args.chat,
    }
    report = run_eval(
        engine,
        suite,
        methods,
        config,
        max_new_tokens=args.max_new_tokens,
        kl=args.kl,
        chat=args.chat,
        journal=journal,
        resume=args.resume,
    )
    print(report.table())
    for path in report.save(args.out, plot=args.plot):
        print(f"wrote {path}")


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]
