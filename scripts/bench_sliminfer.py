"""TTFT of SlimInfer vs our dense path vs `transformers.generate`, side by side, with the FLOP model's ideal.

    python scripts/bench_sliminfer.py                      # cpu-prefill preset, 4096 and 8192 tokens
    python scripts/bench_sliminfer.py --lengths 1024 --repeats 1 --model tiny

Budgets scale with the prompt as the paper's (8192, 4096, 2048) do at 32K: 1/4, 1/8, 1/16. Every round
runs the three contestants on the same prompt in the same process, in a rotating order; the table gives
medians and ratios. The ideal speedup is dense prefill FLOPs over SlimInfer's (`tokensieve.bench.costs`:
a pruning layer's attention runs on every token entering it, its MLP on the kept ones only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import tokensieve
from tokensieve import presets
from tokensieve.bench.costs import ideal_prefill_speedup
from tokensieve.methods import SlimInfer

CONTESTANTS = ("transformers", "dense", "sliminfer")


def random_prompt(length: int, seed: int) -> list[int]:
    """BOS and random byte tokens: a random-weight model reads any text alike."""
    gen = torch.Generator().manual_seed(seed)
    return [presets.BOS_ID, *torch.randint(0, 256, (length - 1,), generator=gen).tolist()]


def hf_ttft(model, prompt: list[int]) -> float:
    """Seconds for `generate(max_new_tokens=1)`: the prefill and the first token, as users call it."""
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def bench(engine: tokensieve.Engine, length: int, repeats: int, method: SlimInfer) -> dict:
    prompt = random_prompt(length, seed=length)
    runs = {
        "transformers": lambda: hf_ttft(engine.model.hf, prompt),
        "dense": lambda: engine.generate(prompt, max_new_tokens=1, method="dense").stats.ttft_s,
        "sliminfer": lambda: engine.generate(prompt, max_new_tokens=1, method=method).stats.ttft_s,
    }
    times: dict[str, list[float]] = {name: [] for name in CONTESTANTS}
    with torch.inference_mode():
        for round_ in range(repeats):
            order = CONTESTANTS[round_ % 3 :] + CONTESTANTS[: round_ % 3]  # nobody always runs first
            for name in order:
                times[name].append(runs[name]())
                print(f"  {length} tokens, round {round_ + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    stats = engine.generate(prompt, max_new_tokens=1, method=method).stats
    median = {name: statistics.median(t) for name, t in times.items()}
    ideal = ideal_prefill_speedup(engine.model.spec, stats)
    return {
        "prompt_tokens": length,
        "times_s": times,
        "median_s": median,
        "speedup_vs_dense": median["dense"] / median["sliminfer"],
        "speedup_vs_transformers": median["transformers"] / median["sliminfer"],
        "ideal_speedup": ideal,
        "fraction_of_ideal": median["dense"] / median["sliminfer"] / ideal,
        "prefill_tokens_per_layer": stats.prefill_tokens_per_layer,
        "prefill_fraction": stats.prefill_fraction,
    }


def table(results: list[dict]) -> str:
    head = (
        "| prompt | transformers | our dense | SlimInfer | vs dense | vs transformers | ideal | of ideal |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {r['prompt_tokens']} | {r['median_s']['transformers']:.2f} s | {r['median_s']['dense']:.2f} s | "
        f"{r['median_s']['sliminfer']:.2f} s | {r['speedup_vs_dense']:.2f}x | {r['speedup_vs_transformers']:.2f}x | "
        f"{r['ideal_speedup']:.2f}x | {r['fraction_of_ideal']:.0%} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cpu-prefill", help="a preset name (random weights)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-sliminfer.json", help="where to write the JSON results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = presets.build(args.model)
    engine = tokensieve.load(model, tokenizer=tokenizer, device="cpu", dtype="float32")
    method = SlimInfer(budgets=(1 / 4, 1 / 8, 1 / 16))
    with torch.inference_mode():  # warm up every path once
        hf_ttft(model, random_prompt(256, seed=0))
        for name in ("dense", method):
            engine.generate(random_prompt(256, seed=0), max_new_tokens=1, method=name)
    results = [bench(engine, length, args.repeats, method) for length in args.lengths]
    report = {
        "model": args.model,
        "spec": engine.model.spec.__dict__,
        "method": method.settings(),
        "threads": args.threads,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
