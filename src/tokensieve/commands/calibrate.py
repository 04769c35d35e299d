"""`tokensieve calibrate-filters`: find a model's OmniKV filter layers from its own decode attention."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    from .options import add_model_arguments, positive_int

    parser = sub.add_parser("calibrate-filters", help="find a model's OmniKV filter layers from its decode attention")
    add_model_arguments(parser)
    parser.add_argument("--prompts", default=None, help="a .jsonl of prompts or a text file (default: random tokens)")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length cap in tokens (default 2048)")
    parser.add_argument(
        "--num-prompts", type=positive_int, default=3, help="random prompts when --prompts is not given"
    )
    parser.add_argument("--steps", type=int, default=8, help="decode steps recorded per prompt")
    parser.add_argument("--top-k", default=None, help="top-K size: tokens or a fraction (default 0.067 of the prompt)")
    parser.add_argument("--out", default="calibration", help="folder for filters.json and filters.png")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from ..calibrate import PAPER_TOP_K_FRACTION, calibrate, load_prompts, plot
    from ..calibrate.output import save
    from .options import load_engine

    if args.tokens < 2 or args.steps < 1:
        raise ValueError(f"--tokens must be >= 2 and --steps >= 1, got {args.tokens} and {args.steps}")
    top_k = PAPER_TOP_K_FRACTION if args.top_k is None else _count_or_fraction(args.top_k)
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise ValueError(f"--prompts {args.prompts}: no such file (a .jsonl of prompts or a text file)")
    engine = load_engine(args)
    tokens = min(args.tokens, engine.model.spec.max_positions - args.steps - 1)
    prompts = load_prompts(engine, args.prompts, tokens, args.num_prompts)
    result = {"model": str(args.model), **calibrate(engine, prompts, args.steps, top_k)}
    title = f"{Path(args.model).name}: OmniKV filter-layer calibration"
    data, figure = save(result, args.out, "filters", lambda result, path: plot(result, path, title))
    curve = ", ".join(f"{c}:{v:.3f}" for c, v in enumerate(result["capture_curve"]) if v is not None)
    print(f"capture per layer  {curve}")
    print(f"paper's layers scaled to {result['layers']} layers: {result['paper_filter_layers_scaled']}")
    print(f"recommended filter layers: {result['recommended_filter_layers']}")
    print(f"wrote {data} and {figure}")


def _count_or_fraction(text: str) -> int | float:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise ValueError(f"--top-k must be a token count (e.g. 128) or a fraction of the prompt (e.g. 0.067), got {text!r}")
