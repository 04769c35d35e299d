"""`--mode batch`: decode throughput and time per token per sequence at each batch size (`--batch 1,4,16`).

Every sequence of a batch has its own prompt of the context length (the haystack prompt with a different
second token, so that each sequence's selections differ). Our dense path and each method run through the
engine's continuous-batching `Scheduler`: the decode time is the sum of its batched decode steps (the
prefills are not counted), the throughput is the tokens those steps produced over that time, and TPOT per
sequence is that time over the number of steps. `transformers` runs batched forward passes on the same
prompts (equal lengths: no padding) on its own `DynamicCache`: the prefill untimed, then T - 1 timed steps.
Contestants alternate their order from one repeat to the next; medians of the repeats.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from ..engine import Engine, Scheduler
from .report import render, x
from .runner import DENSE, TRANSFORMERS, alternating, build_prompt, check_lengths, contestants, timed


def batch_prompts(engine: Engine, length: int, size: int) -> list[list[int]]:
    base = build_prompt(engine.tokenizer, length)
    vocab = engine.model.spec.vocab_size
    return [[base[0], (base[1] + i) % vocab, *base[2:]] for i in range(size)]


def ours(engine: Engine, method: str, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(tokens/s of the decode steps, seconds per step) for our engine with `method`."""
    scheduler = Scheduler(engine, max_batch=len(prompts))
    for prompt in prompts:
        scheduler.submit(prompt, method=method, max_new_tokens=new_tokens, stop=None)
    scheduler.run()
    steps = scheduler.stats.step_seconds
    return scheduler.stats.tokens_per_s, sum(steps) / max(1, len(steps))


def theirs(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """The same for `transformers`: one batched forward pass over the prompts into a `DynamicCache`
    (untimed), then `new_tokens - 1` timed batched decode steps (greedy)."""
    from transformers import DynamicCache

    hf = engine.model.hf
    cache = DynamicCache(config=hf.config)
    with torch.inference_mode():
        logits = hf(torch.tensor(prompts, device=engine.model.device), past_key_values=cache, use_cache=True).logits

        def decode():
            nonlocal logits
            for _ in range(new_tokens - 1):
                token = logits[:, -1].argmax(-1, keepdim=True)
                logits = hf(token, past_key_values=cache, use_cache=True).logits

        seconds = timed(engine, decode)[0]
    per_step = seconds / (new_tokens - 1)
    return len(prompts) / per_step, per_step


def measure_batch(
    engine: Engine, methods: Sequence[str], lengths: Sequence[int], sizes: Sequence[int], new_tokens: int, repeats: int
) -> list[dict[str, Any]]:
    """One row per length, batch size and contestant: medians of tokens/s and TPOT, and the ratio vs our dense."""
    if new_tokens < 2:
        raise ValueError(f"--mode batch needs at least 2 new tokens (a decode step), got {new_tokens}")
    check_lengths(engine, lengths, new_tokens, repeats)
    names = contestants(methods)
    rows = []
    for length in lengths:
        for size in sizes:
            prompts = batch_prompts(engine, length, size)
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for name in names:  # warm-up, untimed
                _run(engine, name, prompts, 2)
            for name in alternating(names, repeats):
                samples[name].append(_run(engine, name, prompts, new_tokens))
            medians = {
                name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
                for name, runs in samples.items()
            }
            for name, (tokens_per_s, tpot) in medians.items():
                rows.append(
                    {"length": length, "batch": size, "method": name, "tokens_per_s": tokens_per_s, "tpot_s": tpot,
                     "vs_dense": tokens_per_s / medians[DENSE][0]}
                )  # fmt: skip
    return rows


def _run(engine: Engine, name: str, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    return theirs(engine, prompts, new_tokens) if name == TRANSFORMERS else ours(engine, name, prompts, new_tokens)


def batch_table(rows: list[dict[str, Any]]) -> str:
    header = ("length", "batch", "method", "decode tokens/s", "TPOT ms per sequence", "throughput vs our dense")
    body = [
        (r["length"], r["batch"], r["method"], f"{r['tokens_per_s']:.1f}", f"{r['tpot_s'] * 1e3:.1f}", x(r["vs_dense"]))
        for r in rows
    ]
    return render([header, *body])
