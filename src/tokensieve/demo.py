"""`tokensieve demo`: one needle-in-a-haystack prompt, dense and every method side by side.

On the embedded testbed model it shows what each method answers, whether that is right, its TTFT and
speedup vs dense and how much of the prompt it computed. Methods run at budgets proportional to the prompt
(the papers' defaults are for 32K-token prompts and would prune nothing at demo lengths).
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from .methods import METHODS, Method


def demo_methods(prompt_tokens: int) -> dict[str, Method]:
    """Each registered method at settings that act on a prompt of this length (dense first)."""
    from .methods import H2O, OmniKV, SlimInfer, SnapKV, StreamingLLM

    budget = max(64, prompt_tokens // 8)  # KV-selection methods keep or attend one eighth of the prompt
    chosen = {
        "dense": METHODS["dense"](),
        "sliminfer": SlimInfer(budgets=(1 / 4, 1 / 8, 1 / 16)),  # the paper's 8K/4K/2K of 32K, as fractions
        "lazyllm": METHODS["lazyllm"](),
        "omnikv": OmniKV(budget=budget),
        "snapkv": SnapKV(budget=budget),
        "h2o": H2O(budget=budget),
        "streaming_llm": StreamingLLM(window=budget - 4),
    }
    return {**chosen, **{name: cls() for name, cls in METHODS.items() if name not in chosen}}


def register(sub) -> None:
    from .commands.options import add_model_arguments, positive_int

    parser = sub.add_parser("demo", help="a needle task on the embedded model: every method beside dense")
    add_model_arguments(parser, default_model="testbed")
    parser.add_argument("--tokens", type=positive_int, default=2048, help="prompt length in tokens (default 2048)")
    parser.add_argument(
        "--task", default="niah_single:words", help="a task of `tokensieve eval` (default niah_single:words)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the task's haystack, needle and values")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from .commands.options import check_context, load_engine
    from .eval.tasks import make_sample, parse_task

    parse_task(args.task)  # these checks before the model loads
    check_context(args.model, args.tokens, "--tokens")
    try:
        engine = load_engine(args)
    except ValueError as missing:
        if args.model != "testbed":
            raise
        print(
            f"NOTE: {missing}\nFalling back to a RANDOM-WEIGHT model (preset cpu-prefill): its answers are noise; "
            "the demo then shows speed, tokens computed and agreement with dense only.\n"
        )
        args.model = "cpu-prefill"
        engine = load_engine(args)
    sample = make_sample(args.task, engine.tokenizer, args.tokens, seed=args.seed)
    prompt, expected = sample.prompt(), sample.turns[0].answers
    print(
        f"model: {args.model}   task: {args.task}, {len(engine.encode(prompt))} prompt tokens   "
        f"expected answer: {', '.join(expected)}\n"
    )

    methods = demo_methods(args.tokens)
    engine.generate(prompt, max_new_tokens=1)  # warm-up: first-call allocations would be charged to dense
    results = {}
    for name, method in tqdm(methods.items(), desc="methods", unit="method"):
        results[name] = engine.generate(prompt, max_new_tokens=sample.max_new_tokens, method=method)
    print(format_table(results, lambda text: sample.score(0, text)))


def format_table(results: dict, score) -> str:
    """One line per method: answer, right or wrong, TTFT, speedup vs dense, prefill computed, same tokens."""
    dense = results["dense"]
    lines = [f"{'method':<14}{'answer':<28}{'right':>6}{'TTFT ms':>10}{'speedup':>9}{'computed':>10}{'same':>7}"]
    for name, gen in results.items():
        s = gen.stats
        answer = gen.text.strip().splitlines()[0][:26] if gen.text.strip() else "(nothing)"
        same = sum(a == b for a, b in zip(gen.token_ids, dense.token_ids, strict=False)) / max(1, len(dense.token_ids))
        lines.append(
            f"{name:<14}{answer!s:<28}{'yes' if score(gen.text) == 1 else 'no':>6}{s.ttft_s * 1e3:>10.1f}"
            f"{dense.stats.ttft_s / s.ttft_s:>8.2f}x{s.prefill_fraction:>10.0%}{same:>7.0%}"
        )
    lines.append("\ncomputed: prefill token-layers vs dense. same: generated tokens equal to dense's.")
    return "\n".join(lines)
