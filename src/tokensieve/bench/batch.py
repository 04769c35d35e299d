"""`--mode batch`: decode throughput and time per token per sequence at each batch size (`--batch 1,4,16`).

Every sequence of a batch has its own prompt of the context length (the haystack prompt with a different
second token, so that each sequence's selections differ). Each contestant prefills the prompts of the
largest batch once (untimed), then decodes in timed rounds of T new tokens; a smaller batch is the first
sequences of the larger one, so no prompt is prefilled twice (at 8K and batch 16 the prefills are most of
the run). Our dense path and each method run through the engine's continuous-batching `Scheduler`: a
round's decode time is the sum of its batched decode steps, its throughput the tokens those steps produced
over that time, TPOT per sequence that time over the steps. `transformers` prefills each prompt on its own
(batched, a 16 x 8K forward pass would hold its attention scores at once), joins the caches into one
batched `DynamicCache` and times batched greedy steps on it. Contestants alternate their order from one
round to the next; medians of the rounds. Each round adds T tokens to every context, within 1% of 8K for
T = 16 and three rounds.
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


class OurBatch:
    """Sessions of our engine with one method, prefilled once, decoded in rounds by a `Scheduler`."""

    def __init__(self, engine: Engine, method: str, prompts: list[list[int]]):
        self.engine = engine
        self.sessions = [engine.start(prompt, method=method) for prompt in prompts]

    def keep(self, size: int) -> None:
        """Keep the first `size` sequences (the next, smaller batch); close the others."""
        for session in self.sessions[size:]:
            session.close()
        self.sessions = self.sessions[:size]

    def decode(self, steps: int) -> tuple[float, float]:
        """(tokens/s of the decode steps, seconds per step) of `steps` new tokens of every sequence."""
        scheduler = Scheduler(self.engine, max_batch=len(self.sessions))
        for session in self.sessions:
            scheduler.add(session, max_new_tokens=steps, stop=None)
        scheduler.run()
        seconds = scheduler.stats.step_seconds
        return scheduler.stats.tokens_per_s, sum(seconds) / max(1, len(seconds))


class TheirBatch:
    """`transformers` on the same prompts: one batched `DynamicCache`, batched greedy decode steps."""

    def __init__(self, engine: Engine, prompts: list[list[int]]):
        from transformers import DynamicCache

        self.engine = engine
        self.hf = engine.model.hf
        caches, logits = [], []
        with torch.inference_mode():
            for prompt in prompts:
                cache = DynamicCache(config=self.hf.config)
                ids = torch.tensor([prompt], device=engine.model.device)
                logits.append(self.hf(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits)
                caches.append(cache)
            layers = [
                (torch.cat([c.layers[i].keys for c in caches]), torch.cat([c.layers[i].values for c in caches]))
                for i in range(len(caches[0].layers))
            ]
        self.cache = DynamicCache(layers, config=self.hf.config)
        self.logits = torch.cat(logits)
        self.generated: list[torch.Tensor] = []  # each step's tokens [batch, 1]

    def keep(self, size: int) -> None:
        self.cache.batch_select_indices(torch.arange(size, device=self.logits.device))
        self.logits = self.logits[:size]
        self.generated = [tokens[:size] for tokens in self.generated]

    def tokens(self) -> list[list[int]]:
        """Every sequence's generated tokens so far."""
        return torch.cat(self.generated, 1).tolist() if self.generated else [[] for _ in self.logits]

    def decode(self, steps: int) -> tuple[float, float]:
        def run():
            with torch.inference_mode():
                for _ in range(steps):
                    token = self.logits[:, -1].argmax(-1, keepdim=True)
                    self.generated.append(token)
                    self.logits = self.hf(token, past_key_values=self.cache, use_cache=True).logits

        per_step = timed(self.engine, run)[0] / steps
        return len(self.logits) / per_step, per_step


def measure_batch(
    engine: Engine, methods: Sequence[str], lengths: Sequence[int], sizes: Sequence[int], new_tokens: int, repeats: int
) -> list[dict[str, Any]]:
    """One row per length, batch size and contestant: medians of tokens/s and TPOT, and the ratio vs our dense."""
    if new_tokens < 2:
        raise ValueError(f"--mode batch needs at least 2 new tokens (a decode step), got {new_tokens}")
    check_lengths(engine, lengths, len(sizes) * (repeats * new_tokens + 1), repeats)  # every round adds to the contexts
    names = contestants(methods)
    rows = []
    for length in lengths:
        prompts = batch_prompts(engine, length, max(sizes))
        batches = {name: _prefilled(engine, name, prompts) for name in names}
        for size in sorted(sizes, reverse=True):
            for batch in batches.values():
                batch.keep(size)
                batch.decode(1)  # warm-up at this size, untimed
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for name in alternating(names, repeats):
                samples[name].append(batches[name].decode(new_tokens))
            rows += _rows(length, size, samples)
        del batches
    return sorted(rows, key=lambda r: (r["length"], r["batch"]))


def _prefilled(engine: Engine, name: str, prompts: list[list[int]]) -> OurBatch | TheirBatch:
    return TheirBatch(engine, prompts) if name == TRANSFORMERS else OurBatch(engine, name, prompts)


def _rows(length: int, size: int, samples: dict[str, list[tuple[float, float]]]) -> list[dict[str, Any]]:
    medians = {
        name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        for name, runs in samples.items()
    }
    return [
        {"length": length, "batch": size, "method": name, "tokens_per_s": tokens_per_s, "tpot_s": tpot,
         "vs_dense": tokens_per_s / medians[DENSE][0]}
        for name, (tokens_per_s, tpot) in medians.items()
    ]  # fmt: skip


def batch_table(rows: list[dict[str, Any]]) -> str:
    header = ("length", "batch", "method", "decode tokens/s", "TPOT ms per sequence", "throughput vs our dense")
    body = [
        (r["length"], r["batch"], r["method"], f"{r['tokens_per_s']:.1f}", f"{r['tpot_s'] * 1e3:.1f}", x(r["vs_dense"]))
        for r in rows
    ]
    return render([header, *body])
