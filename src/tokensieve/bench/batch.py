"""`--mode batch`: prefill and decode throughput, and time per token per sequence, at each batch size
(`--batch 1,4,16`).

Every sequence of a batch has its own prompt of the context length (the haystack prompt with a different
second token, so that each sequence's selections differ). Each contestant prefills a batch's prompts once
(timed: prefill tokens/s), then decodes in timed rounds of T new tokens. With `--shared-prompt` every
sequence continues one prefilled prompt instead (`Session.fork`; `transformers`: its cache repeated), so
a long context's batch costs one prefill per contestant: decode throughput is the same work (nothing is
shared between the copies), only the selections of a method are then alike across the batch.

Our dense path and each method run through the engine's continuous-batching `Scheduler`: the prefill is
the scheduler's (prompts that fit `prefill_tokens` together share one pass), a round's decode time is the
sum of its batched decode steps, its throughput the tokens those steps produced over that time, TPOT per
sequence that time over the steps. `transformers` prefills the same groups of prompts in one batched
forward pass each (equal lengths: no padding; a 16 x 8K pass would hold every prompt's activations at
once), joins the caches into one batched `DynamicCache` and times batched greedy steps on it. Contestants
alternate their order from one round to the next; medians of the rounds. The ideal beside each method is
the cost model's: bytes of a batched dense step (the weights once, every sequence's KV) over the method's,
from what each sequence attended and loaded.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from ..engine import Engine, Scheduler
from ..engine.scheduler import PREFILL_TOKENS
from ..generation import Stats
from . import costs
from .report import render, x
from .runner import DENSE, TRANSFORMERS, alternating, build_prompt, check_lengths, contestants, timed


def batch_prompts(engine: Engine, length: int, size: int) -> list[list[int]]:
    base = build_prompt(engine.tokenizer, length)
    vocab = engine.model.spec.vocab_size
    return [[base[0], (base[1] + i) % vocab, *base[2:]] for i in range(size)]


class OurBatch:
    """Sessions of our engine with one method, decoded in rounds by a `Scheduler`."""

    def __init__(self, engine: Engine, sessions: list, prefill_s: float | None):
        self.engine = engine
        self.sessions = sessions
        self.prefill_s = prefill_s  # the batch's prefill time (None: copies of a prefilled session)

    @classmethod
    def prefill(cls, engine: Engine, method: str, prompts: list[list[int]]) -> OurBatch:
        """The prompts prefilled by a `Scheduler` (timed): one new token each comes from the prefill's logits."""
        batch = cls(engine, [engine.start(prompt, method=method, defer_prefill=True) for prompt in prompts], None)
        batch.prefill_s = timed(engine, lambda: batch._run(1))[0]
        return batch

    def copies(self, size: int) -> OurBatch:
        """`size` forks of the first session (`Session.fork`): one context prefilled once, continued `size` times."""
        return OurBatch(self.engine, [self.sessions[0].fork() for _ in range(size)], None)

    def decode(self, steps: int) -> tuple[float, float]:
        """(tokens/s of the decode steps, seconds per step) of `steps` new tokens of every sequence."""
        stats = self._run(steps)
        return stats.tokens_per_s, sum(stats.step_seconds) / max(1, len(stats.step_seconds))

    def last_stats(self) -> list[Stats]:
        """Each sequence's stats of the last round (keys attended, bytes loaded: what the cost model reads)."""
        return [session.calls[-1] for session in self.sessions]

    def close(self) -> None:
        for session in self.sessions:
            session.close()

    def _run(self, new_tokens: int):
        scheduler = Scheduler(self.engine, max_batch=len(self.sessions))
        for session in self.sessions:
            scheduler.add(session, max_new_tokens=new_tokens, stop=None)
        scheduler.run()
        return scheduler.stats


class TheirBatch:
    """`transformers` on the same prompts: one batched `DynamicCache`, batched greedy decode steps."""

    def __init__(self, engine: Engine, cache, logits: torch.Tensor, prefill_s: float | None):
        self.engine = engine
        self.hf = engine.model.hf
        self.cache = cache
        self.logits = logits
        self.prefill_s = prefill_s
        self.generated: list[torch.Tensor] = []  # each step's tokens [batch, 1]

    @classmethod
    def prefill(cls, engine: Engine, prompts: list[list[int]]) -> TheirBatch:
        """The prompts in groups of the scheduler's size (timed), the groups' caches joined into one."""
        from transformers import DynamicCache

        hf = engine.model.hf
        per_pass = max(1, PREFILL_TOKENS // len(prompts[0]))
        caches, logits = [], []

        def prefill():
            with torch.inference_mode():
                for start in range(0, len(prompts), per_pass):
                    cache = DynamicCache(config=hf.config)
                    ids = torch.tensor(prompts[start : start + per_pass], device=engine.model.device)
                    logits.append(hf(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits)
                    caches.append(cache)

        seconds = timed(engine, prefill)[0]
        layers = [
            (torch.cat([c.layers[i].keys for c in caches]), torch.cat([c.layers[i].values for c in caches]))
            for i in range(len(caches[0].layers))
        ]
        return cls(engine, DynamicCache(layers, config=hf.config), torch.cat(logits), seconds)

    def copies(self, size: int) -> TheirBatch:
        """`size` copies of the first sequence's cache, as one batch."""
        cache = copy.deepcopy(self.cache)
        cache.batch_select_indices(torch.tensor([0], device=self.logits.device))
        cache.batch_repeat_interleave(size)
        return TheirBatch(self.engine, cache, self.logits[:1].repeat(size, 1, 1), None)

    def tokens(self) -> list[list[int]]:
        """Every sequence's generated tokens so far, the one its last logits choose included."""
        chosen = [*self.generated, self.logits[:, -1].argmax(-1, keepdim=True)]
        return torch.cat(chosen, 1).tolist()

    def decode(self, steps: int) -> tuple[float, float]:
        def run():
            with torch.inference_mode():
                for _ in range(steps):
                    token = self.logits[:, -1].argmax(-1, keepdim=True)
                    self.generated.append(token)
                    self.logits = self.hf(token, past_key_values=self.cache, use_cache=True).logits

        per_step = timed(self.engine, run)[0] / steps
        return len(self.logits) / per_step, per_step

    def close(self) -> None:
        self.cache = None


def measure_batch(
    engine: Engine,
    methods: Sequence[str],
    lengths: Sequence[int],
    sizes: Sequence[int],
    new_tokens: int,
    repeats: int,
    shared_prompt: bool = False,
) -> list[dict[str, Any]]:
    """One row per length, batch size and contestant: prefill tokens/s, medians of decode tokens/s and TPOT,
    the decode ratio vs our dense and the byte-model ideal. `shared_prompt`: every sequence continues one
    prefilled prompt (copies), so a long context costs one prefill per contestant (no prefill figure)."""
    if new_tokens < 2:
        raise ValueError(f"--mode batch needs at least 2 new tokens (a decode step), got {new_tokens}")
    check_lengths(engine, lengths, repeats * new_tokens + 2, repeats)  # every round adds to the contexts
    names = contestants(methods)
    rows = []
    for length in lengths:
        one = batch_prompts(engine, length, 1)
        bases = {name: _prefilled(engine, name, one) for name in names} if shared_prompt else {}
        for size in sizes:
            if shared_prompt:
                batches = {name: base.copies(size) for name, base in bases.items()}
            else:
                batches = {name: _prefilled(engine, name, batch_prompts(engine, length, size)) for name in names}
            for batch in batches.values():
                batch.decode(1)  # warm-up, untimed
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for name in alternating(names, repeats):
                samples[name].append(batches[name].decode(new_tokens))
            prefill = {name: _per_s(size * length, batch.prefill_s) for name, batch in batches.items()}
            ideal = {
                name: costs.ideal_batch_decode_speedup(
                    engine.model.spec, engine.model.dtype, batches[DENSE].last_stats(), batch.last_stats()
                )
                for name, batch in batches.items()
                if isinstance(batch, OurBatch)
            }
            rows += _rows(length, size, samples, prefill, ideal)
            for batch in batches.values():
                batch.close()
        for base in bases.values():
            base.close()
    return rows


def _per_s(tokens: int, seconds: float | None) -> float | None:
    return None if seconds is None else tokens / seconds


def _prefilled(engine: Engine, name: str, prompts: list[list[int]]) -> OurBatch | TheirBatch:
    return TheirBatch.prefill(engine, prompts) if name == TRANSFORMERS else OurBatch.prefill(engine, name, prompts)


def _rows(
    length: int,
    size: int,
    samples: dict[str, list[tuple[float, float]]],
    prefill: dict[str, float | None],
    ideal: dict[str, float],
) -> list[dict[str, Any]]:
    medians = {
        name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        for name, runs in samples.items()
    }
    return [
        {"length": length, "batch": size, "method": name, "prefill_tokens_per_s": prefill[name],
         "tokens_per_s": tokens_per_s, "tpot_s": tpot, "vs_dense": tokens_per_s / medians[DENSE][0],
         "ideal_vs_dense": ideal.get(name)}
        for name, (tokens_per_s, tpot) in medians.items()
    ]  # fmt: skip


def batch_table(rows: list[dict[str, Any]]) -> str:
    header = ("length", "batch", "method", "prefill tokens/s", "decode tokens/s", "TPOT ms per sequence",
              "decode vs our dense", "ideal (bytes)")  # fmt: skip
    body = [
        (r["length"], r["batch"], r["method"], "-" if r["prefill_tokens_per_s"] is None else
         f"{r['prefill_tokens_per_s']:.0f}", f"{r['tokens_per_s']:.1f}", f"{r['tpot_s'] * 1e3:.1f}", x(r["vs_dense"]),
         x(r["ideal_vs_dense"]))
        for r in rows
    ]  # fmt: skip
    return render([header, *body])
