"""`tokensieve demo`: every method side by side with dense on one long prompt, in a minute or two on a CPU."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from .methods import METHODS


def register(sub) -> None:
    parser = sub.add_parser("demo", help="run every method beside dense on one long prompt and compare")
    parser.add_argument(
        "--model",
        default="cpu-prefill",
        help="a checkpoint directory or a preset (default: cpu-prefill, random weights)",
    )
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from .cli import load_engine

    print(
        "NOTE: no trained testbed model is embedded yet, so this demo runs on a RANDOM-WEIGHT model built in "
        f"memory ({args.model}). Its text is noise; what the demo shows is speed, tokens computed and agreement "
        "with the dense model's tokens.\n"
    )
    engine = load_engine(args)
    prompt = torch.randint(0, 256, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    results = {}
    for name in tqdm(["dense", *sorted(set(METHODS) - {"dense"})], desc="methods", unit="method"):
        engine.generate(prompt[:256], max_new_tokens=2, method=name)  # warm-up
        results[name] = engine.generate(prompt, max_new_tokens=args.new_tokens, method=name)
    dense = results["dense"]
    print(f"\nprompt: {args.tokens} tokens, {args.new_tokens} new tokens, greedy\n")
    print(f"{'method':<14}{'TTFT ms':>10}{'speedup':>10}{'TPOT ms':>10}{'prefill computed':>18}{'same tokens':>13}")
    for name, gen in results.items():
        same = sum(a == b for a, b in zip(gen.token_ids, dense.token_ids, strict=False)) / max(1, len(dense.token_ids))
        s = gen.stats
        print(
            f"{name:<14}{s.ttft_s * 1e3:>10.1f}{dense.stats.ttft_s / s.ttft_s:>9.2f}x{s.tpot_s * 1e3:>10.2f}"
            f"{s.prefill_fraction:>18.1%}{same:>13.0%}"
        )
