"""`--mode decode`: time per output token at each context length, without timing any prefill.

Each contestant prefills the prompt once per length, untimed: our dense path and each method through a
public session (`engine.start`), `transformers` by one forward pass filling a `DynamicCache`. Then, in
rounds that alternate the contestants' order, each decodes `steps` tokens (our contestants by
`session.generate`, `transformers` one forward pass per token on its cache); a round's time per token is
its wall time over `steps`. The cost: one full prefill per contestant and length, paid before the clock
starts (at 16K on a CPU that is minutes), and the context grows by `steps` tokens every round.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from ..engine import Engine
from . import costs
from .report import ms, render, spread, x
from .runner import DENSE, TRANSFORMERS, alternating, build_prompt, check_lengths, contestants, timed


class SessionDecoder:
    """Our dense path or a method: a session prefilled once, then `decode(steps)` as often as wanted."""

    def __init__(self, engine: Engine, name: str, prompt: list[int]):
        self.engine = engine
        self.session = engine.start(prompt, method=name)
        self.session.generate(max_new_tokens=1)  # the token after the prompt: no decode step yet
        self.stats = None

    def decode(self, steps: int) -> float:
        seconds, generation = timed(self.engine, lambda: self.session.generate(max_new_tokens=steps))
        self.stats = generation.stats
        return seconds / generation.stats.new_tokens

    def close(self) -> None:
        self.session.close()


class HFDecoder:
    """`transformers`' forward pass over the prompt into a `DynamicCache`, then one token per forward pass."""

    def __init__(self, engine: Engine, prompt: list[int]):
        from transformers import DynamicCache

        self.engine, self.hf = engine, engine.model.hf
        self.cache = DynamicCache(config=self.hf.config)
        self.token = self._forward(prompt)
        self.stats = None

    def decode(self, steps: int) -> float:
        def run():
            for _ in range(steps):
                self.token = self._forward([self.token])

        return timed(self.engine, run)[0] / steps

    def _forward(self, ids: list[int]) -> int:
        tensor = torch.tensor([ids], device=self.engine.model.device)
        with torch.inference_mode():
            logits = self.hf(input_ids=tensor, past_key_values=self.cache, use_cache=True).logits
        return int(logits[0, -1].argmax())

    def close(self) -> None:
        self.cache = None


def measure_decode(
    engine: Engine,
    methods: Sequence[str],
    lengths: Sequence[int],
    *,
    steps: int = 16,
    repeats: int = 3,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """TPOT of every contestant at every length: medians of `repeats` rounds of `steps` decode steps each."""
    if steps < 1:
        raise ValueError(f"steps (--new-tokens) must be >= 1 decode step per round, got {steps}")
    check_lengths(engine, lengths, 1 + steps * repeats, repeats)
    names = contestants(methods)
    rows = []
    bar = tqdm(total=len(lengths) * len(names) * (repeats + 1), desc="decode", unit="run", disable=not progress)
    for length in lengths:
        prompt = build_prompt(engine.tokenizer, length)
        decoders, times = {}, {name: [] for name in names}
        for name in names:  # untimed prefills
            bar.set_postfix_str(f"prefill {name} @ {length}")
            decoders[name] = HFDecoder(engine, prompt) if name == TRANSFORMERS else SessionDecoder(engine, name, prompt)
            bar.update()
        for name in alternating(names, repeats):
            bar.set_postfix_str(f"{name} @ {length}")
            times[name].append(decoders[name].decode(steps))
            bar.update()
        rows += _records(engine, length, steps, times, decoders)
        for decoder in decoders.values():
            decoder.close()
    bar.close()
    return rows


def _records(engine: Engine, length: int, steps: int, times: dict, decoders: dict) -> list[dict[str, Any]]:
    spec, dtype = engine.model.spec, engine.model.dtype
    medians = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for name, values in times.items():
        stats = decoders[name].stats
        ideal = costs.ideal_decode_speedup(spec, dtype, stats) if stats else 1.0
        vs_hf = medians[TRANSFORMERS] / medians[name]
        rows.append(
            {
                "method": name,
                "length": length,
                "steps": steps,
                "rounds": len(values),
                "tpot_s": spread(values),
                "speedup_vs_transformers": vs_hf,
                "speedup_vs_dense": medians[DENSE] / medians[name],
                "ideal_speedup": ideal,
                "of_ideal": vs_hf / ideal if ideal else None,
                "stats": stats.to_dict() if stats else None,
            }
        )
    return rows


def decode_table(rows: Sequence[dict[str, Any]]) -> str:
    """TPOT per contestant and length, against `transformers`, our dense path and the byte-model ideal."""
    lines = [("method", "tokens", "TPOT ms [min-max]", "x HF", "x dense", "ideal", "of ideal", "keys/layer")]
    for r in rows:
        keys = r["stats"]["decode_keys_per_layer"] if r["stats"] else None
        lines.append(
            (r["method"], r["length"], ms(r["tpot_s"]), x(r["speedup_vs_transformers"]), x(r["speedup_vs_dense"]))
            + (x(r["ideal_speedup"]), f"{r['of_ideal']:.0%}", f"{sum(keys) / len(keys):.0f}" if keys else "-")
        )
    return f"Decode (prefill untimed, {rows[0]['steps']} steps per round)\n{render(lines)}"
