"""`tokensieve calibrate-pruning`: SlimInfer's and LazyLLM's pruning schedules measured on needle prompts."""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

MIN_TOKENS = 64  # the needle generator's shortest prompt


def register(sub) -> None:
    from .options import add_haystack_argument, add_model_arguments, positive_int

    parser = sub.add_parser(
        "calibrate-pruning",
        help="measure SlimInfer's and LazyLLM's pruning layers and budgets on needle prompts; recommend a schedule",
        description="Run dense and a grid of SlimInfer / LazyLLM settings on a few number-needle prompts of your "
        "model; record needle accuracy, greedy agreement with dense, the share of the prompt computed in prefill "
        "and TTFT vs dense; recommend per method the cheapest setting as accurate as dense. Writes pruning.json "
        "and pruning.png.",
    )
    add_model_arguments(parser)
    add_haystack_argument(parser)
    parser.add_argument("--tokens", type=positive_int, default=2048, help="prompt length in tokens of the model")
    parser.add_argument("--num-prompts", type=positive_int, default=4, help="needle prompts (seeds 0, 1, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt")
    parser.add_argument("--methods", default="sliminfer,lazyllm", help="comma-separated: sliminfer, lazyllm")
    parser.add_argument(
        "--candidate",
        action="append",
        default=None,
        metavar="SPEC",
        help="a setting to measure, as a method spec, e.g. 'sliminfer(prune_layers=(15,), budgets=(0.25,))'; "
        "repeatable; the candidates given replace their method's default grid",
    )
    parser.add_argument(
        "--grid",
        default=None,
        help="a JSON file of candidate specs (a list, or a pruning.json: its candidates), added to --candidate",
    )
    parser.add_argument(
        "--chat", action="store_true", help="wrap every prompt in the model's chat template (instruction-tuned models)"
    )
    parser.add_argument("--out", default="calibration", help="folder for pruning.json and pruning.png")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from ..calibrate.grid import check_candidate, check_methods, read_grid
    from ..calibrate.output import save
    from ..calibrate.pruning import plot, table
    from ..eval.runner import require_chat_template
    from ..methods import split_methods
    from .options import check_context, haystack_of, load_engine

    started = time.perf_counter()
    methods = check_methods(split_methods(args.methods))
    given = [*(args.candidate or []), *(read_grid(args.grid) if args.grid else [])]
    for spec in given:
        check_candidate(spec, methods)  # a clear error now, before the model loads
    if args.tokens < MIN_TOKENS:
        raise ValueError(f"--tokens must be at least {MIN_TOKENS} (the needle prompts' shortest), got {args.tokens}")
    haystack = haystack_of(args)
    check_context(args.model, args.tokens, "--tokens")
    engine = load_engine(args)
    if args.chat:
        require_chat_template(engine.tokenizer)
    candidates = _candidates(engine.model.spec.num_layers, methods, given, args.tokens)
    samples = _prompts(engine, args, haystack)
    result = _measure(engine, args, samples, candidates)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    title = f"{Path(args.model).name}: pruning schedules on {len(samples)} needle prompts of {args.tokens} tokens"
    data, figure = save(result, args.out, "pruning", lambda result, path: plot(result, path, title))
    print(table(result))
    print(f"wrote {data} and {figure} ({result['wall_s']:.0f} s)")
    if result["method_defaults"]:
        print(
            f"to make the recommendations what {' and '.join(result['method_defaults'])} mean with this model: "
            f"--method-defaults {data}, or copy its method_defaults into the checkpoint's tokensieve.json"
        )


def _candidates(num_layers: int, methods: list[str], given: list[str], tokens: int) -> dict[str, str]:
    """Spec -> method name: the given candidates, and the default grid of each method without any."""
    from ..calibrate.grid import check_candidate, default_grid

    candidates = {spec: check_candidate(spec, methods, num_layers, tokens) for spec in given}
    for method in methods:
        if method not in candidates.values():
            candidates.update({spec: method for spec in default_grid(method, num_layers)})
    return candidates


def _prompts(engine, args: argparse.Namespace, haystack):
    """The needle samples, refused when a prompt and its answer would not fit the model's positions."""
    from ..calibrate.pruning import needle_prompts

    limit = engine.model.spec.max_positions
    if args.tokens + 1 > limit:
        raise ValueError(f"--tokens {args.tokens} exceeds the {limit} positions of {args.model}: ask for fewer")
    samples = needle_prompts(engine.tokenizer, args.tokens, args.num_prompts, haystack, args.chat, args.seed)
    room = max(s.max_new_tokens for s in samples)
    if args.tokens + room > limit:
        raise ValueError(
            f"--tokens {args.tokens} plus {room} answer tokens exceed the {limit} positions of {args.model}: "
            f"ask for at most {limit - room}"
        )
    return samples


def _measure(engine, args: argparse.Namespace, samples, candidates: dict[str, str]) -> dict:
    from ..calibrate.pruning import calibrate_pruning

    return {
        "model": str(args.model),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "haystack": args.haystack or "procedural",
        "tokens": args.tokens,
        "seed": args.seed,
        "threads": args.threads,
        **calibrate_pruning(engine, samples, candidates, chat=args.chat),
    }
