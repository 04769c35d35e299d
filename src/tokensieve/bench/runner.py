"""Measurement: every contestant on the same prompt, in the same process, alternating, repeated.

The contestants at each context length are `transformers` (`generate`, SDPA) on the very model the engine
wraps, our dense path, and each requested method. One warm-up run of each comes first; the order of the
contestants alternates from one repeat to the next, so slow drift (thermal, other processes) hits all of
them alike.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..engine import Engine
from ..generation import Stats
from ..methods import resolve_method

TRANSFORMERS = "transformers"
DENSE = "dense"

# RULER's noise sentences: a neutral haystack any tokenizer handles, and the same text on every machine.
HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the special magic number in the text above? Answer:"


@dataclass
class Sample:
    """One timed generation. `stats` is None for `transformers`; memory fields are None where unmeasured."""

    ttft_s: float
    tpot_s: float
    e2e_s: float
    new_tokens: int
    peak_device_bytes: int | None
    peak_rss_bytes: int
    stats: Stats | None = None


@dataclass
class Series:
    """The repeats of one contestant at one context length."""

    method: str
    length: int
    samples: list[Sample] = field(default_factory=list)


def contestants(methods: Sequence[str]) -> list[str]:
    """`transformers`, our dense path, then the requested methods (names or specs such as
    "omnikv(budget=256)", each once); an unknown method or bad settings are an error here, before any run."""
    for spec in methods:
        resolve_method(spec)
    return [TRANSFORMERS, DENSE, *dict.fromkeys(spec for spec in methods if spec.lower() != DENSE)]


def build_prompt(tokenizer, length: int) -> list[int]:
    """Exactly `length` token ids: the tokenizer's BOS (if any), haystack sentences, then a question."""
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    room = length - len(question)
    if room < 2:
        raise ValueError(f"a context length of {length} tokens is too short: use at least {len(question) + 2}")
    per_copy = max(1, len(tokenizer(HAYSTACK * 8, add_special_tokens=False)["input_ids"]) // 8)
    copies = room // per_copy + 8
    ids = tokenizer(HAYSTACK * copies)["input_ids"]
    while len(ids) < room:  # a tokenizer that merges across sentences needs a few more copies
        copies *= 2
        ids = tokenizer(HAYSTACK * copies)["input_ids"]
    return list(ids[:room]) + list(question)


def measure(
    engine: Engine,
    methods: Sequence[str],
    lengths: Sequence[int],
    *,
    new_tokens: int = 32,
    repeats: int = 3,
    progress: bool = True,
) -> list[Series]:
    """Time every contestant's whole generation at every length, `repeats` times, alternating order."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 so that time per output token is defined, got {new_tokens}")
    return _alternate(engine, methods, lengths, new_tokens, repeats, progress)


def measure_ttft(
    engine: Engine, methods: Sequence[str], lengths: Sequence[int], *, repeats: int = 3, progress: bool = True
) -> list[Series]:
    """Time to first token only: each run generates one token, so it is the prefill and the first pick."""
    return _alternate(engine, methods, lengths, 1, repeats, progress)


def check_lengths(engine: Engine, lengths: Sequence[int], new_tokens: int, repeats: int) -> None:
    """Clear errors for settings no run can satisfy."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not lengths:
        raise ValueError("no context lengths given: pass at least one, e.g. [4096]")
    limit = engine.model.spec.max_positions
    if max(lengths) + new_tokens > limit:
        raise ValueError(f"{max(lengths)} tokens plus {new_tokens} new ones exceed the model's {limit} positions")


def _alternate(engine: Engine, methods, lengths, new_tokens: int, repeats: int, progress: bool) -> list[Series]:
    check_lengths(engine, lengths, new_tokens, repeats)
    names = contestants(methods)
    prompts = {length: build_prompt(engine.tokenizer, length) for length in lengths}
    _warm_up(engine, names, min(lengths), min(2, new_tokens))
    series = {(name, length): Series(name, length) for length in lengths for name in names}
    bar = tqdm(total=len(series) * repeats, desc="bench", unit="run", disable=not progress)
    for length in lengths:
        for name in alternating(names, repeats):
            bar.set_postfix_str(f"{name} @ {length}")
            series[name, length].samples.append(run_once(engine, name, prompts[length], new_tokens))
            bar.update()
    bar.close()
    return list(series.values())


def _warm_up(engine: Engine, names: Sequence[str], shortest: int, new_tokens: int) -> None:
    """One untimed run of each contestant, on a short prompt where its settings allow one (a budget given as a
    fraction can be too small on 256 tokens), else on the shortest prompt measured."""
    short = build_prompt(engine.tokenizer, min(256, shortest))
    for name in names:
        try:
            run_once(engine, name, short, new_tokens)
        except ValueError:
            run_once(engine, name, build_prompt(engine.tokenizer, shortest), new_tokens)


def alternating(names: Sequence[str], repeats: int):
    """Every name once per repeat, in order, then in reverse order on the next repeat, and so on."""
    for repeat in range(repeats):
        yield from names if repeat % 2 == 0 else reversed(names)


def run_once(engine: Engine, name: str, prompt: list[int], new_tokens: int) -> Sample:
    """One timed generation of `new_tokens` after `prompt` by contestant `name`."""
    device = engine.model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if name == TRANSFORMERS:
        e2e, (ttft, generated) = timed(engine, lambda: hf_generate(engine, prompt, new_tokens))
        tpot = (e2e - ttft) / (generated - 1) if generated > 1 else 0.0
        stats = None
    else:
        e2e, gen = timed(engine, lambda: engine.generate(prompt, max_new_tokens=new_tokens, method=name))
        stats, generated = gen.stats, gen.stats.new_tokens
        ttft, tpot = stats.ttft_s, stats.tpot_s
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Sample(ttft, tpot, e2e, generated, peak, peak_rss_bytes(), stats)


def hf_generate(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, int]:
    """`transformers`' own greedy generation with SDPA; returns its time to first token and new tokens."""
    hf = engine.model.hf
    ids = torch.tensor([prompt], device=engine.model.device)
    eos = hf.generation_config.eos_token_id
    clock = _TokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=eos[0] if isinstance(eos, list) else eos,
            streamer=clock,
        )
    return clock.first_token - start, out.shape[1] - ids.shape[1]


class _TokenClock:
    """Notes when `generate` hands over its first new token, so TTFT and TPOT come from one run.

    A streamer as `generate` expects one (put/end): it puts the prompt first, then each new token as a CPU
    tensor (the copy waits for the device, so the time is taken after the token exists).
    """

    def __init__(self):
        self.puts = 0
        self.first_token = 0.0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token = time.perf_counter()

    def end(self) -> None:
        pass


def timed(engine: Engine, fn):
    """Seconds `fn()` took (the device synchronised on both sides) and its result."""
    sync = engine.model.device.type == "cuda"
    if sync:
        torch.cuda.synchronize(engine.model.device)
    start = time.perf_counter()
    result = fn()
    if sync:
        torch.cuda.synchronize(engine.model.device)
    return time.perf_counter() - start, result


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (a high-water mark: it never goes down)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
