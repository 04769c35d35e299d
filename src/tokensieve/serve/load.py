"""A client-side load measurement of `tokensieve serve` against in-process `stream` at concurrency 1.

`python -m tokensieve.serve.load --model tiny --concurrency 1,4 --requests 16` serves the model from a
thread on a free loopback port, sends streaming completions `--concurrency` at a time, and prints per
method: requests/s, TTFT (send to the first chunk) and TPOT ((last chunk - first chunk) / (tokens - 1))
percentiles, beside the same figures of in-process `engine.stream` one request at a time, and the server's
overhead at concurrency 1 (`--repeats N` alternates N runs of each and takes medians). Prompts are
fixed-length random byte strings, distinct per request, and these requests ask for no reuse. `--turns N`
adds a conversation of N turns (each prompt: the previous one, its reply and a new turn of `--prompt-tokens`)
run twice, with prefix reuse and without, printing each turn's TTFT and the tokens the server computed.
`--url` measures a server already running in another process (`tokensieve serve`) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Load:
    """The timings of one or more runs of the same requests: what `row` summarizes (requests/s: the median
    over the runs; TTFT and TPOT: percentiles over every request of every run)."""

    label: str
    concurrency: int
    rates: list[float] = field(default_factory=list)  # requests/s of each run
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)

    def add(self, sent: float, pieces: list[float], tokens: int) -> None:
        self.ttft_s.append(pieces[0] - sent)
        if tokens > 1:
            self.tpot_s.append((pieces[-1] - pieces[0]) / (tokens - 1))

    def merge(self, run: Load) -> None:
        self.rates += run.rates
        self.ttft_s += run.ttft_s
        self.tpot_s += run.tpot_s

    @property
    def requests_per_s(self) -> float:
        return float(np.median(self.rates))

    def row(self) -> str:
        ms = [1000 * np.percentile(values, q) for values in (self.ttft_s, self.tpot_s) for q in (50, 90)]
        return (
            f"| {self.label} | {self.concurrency} | {self.requests_per_s:.2f} | "
            + " | ".join(f"{v:.1f}" for v in ms)
            + " |"
        )


def overhead(local: Load, served: Load) -> str:
    """The server's cost at concurrency 1 against in-process `stream`, from the medians of the runs."""
    fewer = 1 - served.requests_per_s / local.requests_per_s
    ttft = float(np.median(served.ttft_s) / np.median(local.ttft_s)) - 1
    runs = min(len(local.rates), len(served.rates))
    return (
        f"server overhead at concurrency 1, {local.label.split(', ', 1)[1]}: {100 * fewer:+.1f}% requests/s lost, "
        f"TTFT p50 {100 * ttft:+.1f}% (medians of {runs} alternating runs)"
    )


COLUMNS = ("run", "concurrency", "requests/s", "TTFT p50 ms", "TTFT p90 ms", "TPOT p50 ms", "TPOT p90 ms")
HEADER = "| " + " | ".join(COLUMNS) + " |\n" + "|---" * len(COLUMNS) + "|"


TURNS_HEADER = (
    "| turn | context tokens | TTFT ms, reuse | computed | TTFT ms, recomputed | computed |\n|---|---|---|---|---|---|"
)


def prompts(count: int, length: int, seed: int = 0) -> list[str]:
    """`count` distinct printable strings of `length` characters (one byte token each in the presets)."""
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghij klmnop") for _ in range(length)) for _ in range(count)]


def in_process(engine, texts: list[str], max_tokens: int, method: str) -> Load:
    load = Load(f"in-process stream, {method}", 1)
    start = time.perf_counter()
    for text in texts:
        sent, pieces = time.perf_counter(), []
        stream = engine.stream(text, max_new_tokens=max_tokens, method=method)
        for _ in stream:
            pieces.append(time.perf_counter())
        pieces.append(time.perf_counter())  # the end, as the server's last chunk (a text may have no piece)
        load.add(sent, pieces, stream.generation.stats.new_tokens)
    load.rates.append(len(texts) / (time.perf_counter() - start))
    return load


@dataclass
class Timed:
    """One streamed completion as the client saw it."""

    sent: float
    pieces: list[float] = field(default_factory=list)  # arrival time of each chunk with a choice
    text: str = ""
    tokens: int = 0
    extra: dict = field(default_factory=dict)  # the last chunk's `tokensieve` field


async def timed_completion(client, url: str, body: dict) -> Timed:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    timed = Timed(time.perf_counter())
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:  # a text piece, or the last chunk (finish_reason) right after the last token
                timed.pieces.append(time.perf_counter())
                timed.text += chunk["choices"][0]["text"]
            timed.extra = chunk.get("tokensieve", timed.extra)
            timed.tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else timed.tokens
    return timed


async def through_server(url: str, model: str, texts: list[str], max_tokens: int, method: str, concurrency: int):
    import httpx

    load = Load(f"server, {method}", concurrency)
    gate = asyncio.Semaphore(concurrency)

    async def one(client, text: str) -> None:
        body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0}
        async with gate:
            timed = await timed_completion(client, url, body | {"tokensieve": {"method": method, "reuse": False}})
        load.add(timed.sent, timed.pieces, timed.tokens)

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, text) for text in texts))
        load.rates.append(len(texts) / (time.perf_counter() - start))
    return load


async def conversation(url: str, model: str, turns: list[str], max_tokens: int, method: str, reuse: bool):
    """A multi-turn completion conversation (each prompt: the previous prompt, its reply, a new turn);
    per turn: (client TTFT in seconds, prompt tokens computed, context tokens)."""
    import httpx

    prompt, rows = "", []
    async with httpx.AsyncClient(timeout=600) as client:
        for turn in turns:
            prompt += turn
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            timed = await timed_completion(client, url, body | {"tokensieve": {"method": method, "reuse": reuse}})
            stats = timed.extra["stats"]
            rows.append((timed.pieces[0] - timed.sent, timed.extra["computed_tokens"], stats["context_tokens"]))
            prompt += timed.text
    return rows


def main(argv: list[str] | None = None) -> None:
    from ..commands.options import add_model_arguments, load_engine
    from ..methods import split_methods
    from .app import create_app
    from .config import ServeConfig
    from .server import running

    parser = argparse.ArgumentParser(prog="python -m tokensieve.serve.load", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, default_model="tiny")
    parser.add_argument("--methods", default="dense", help="comma-separated method specs")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated client concurrencies")
    parser.add_argument("--requests", type=int, default=16, help="requests per run")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternating runs of each row (requests/s: their median)"
    )
    parser.add_argument("--turns", type=int, default=0, help="also a conversation of this many turns, reuse on/off")
    parser.add_argument(
        "--url", default=None, help="measure this running server (serving --model by that name) instead of one here"
    )
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    engine = load_engine(args)
    name = args.model
    if args.url is None:
        served = running(create_app(engine, ServeConfig(model_name=name, max_waiting=max(levels))))
    else:  # another process: the client no longer shares the server's GIL and cores' scheduling
        served = contextlib.nullcontext((None, args.url.rstrip("/")))
    print(HEADER)
    notes = []
    with served as (_, url):
        for method in split_methods(args.methods):
            texts = prompts(args.requests + 1, args.prompt_tokens)
            in_process(engine, texts[:1], args.max_tokens, method)  # warm-ups
            asyncio.run(through_server(url, name, texts[:1], args.max_tokens, method, 1))
            local = Load(f"in-process stream, {method}", 1)
            served_runs = {level: Load(f"server, {method}", level) for level in levels}
            for _ in range(args.repeats):  # alternating, so that a change of the machine's load hits both
                local.merge(in_process(engine, texts[1:], args.max_tokens, method))
                for level in levels:
                    served_runs[level].merge(
                        asyncio.run(through_server(url, name, texts[1:], args.max_tokens, method, level))
                    )
            for load in (local, *served_runs.values()):
                print(load.row(), flush=True)
            if 1 in served_runs:
                notes.append(overhead(local, served_runs[1]))
        print("\n" + "\n".join(notes), flush=True)
        for method in split_methods(args.methods) if args.turns else []:
            print(f"\n{args.turns} turns of {args.prompt_tokens} tokens, {method}:\n\n{TURNS_HEADER}")
            turns = prompts(args.turns, args.prompt_tokens, seed=1)
            runs = [asyncio.run(conversation(url, name, turns, args.max_tokens, method, r)) for r in (True, False)]
            for i, (reused, recomputed) in enumerate(zip(*runs, strict=True)):
                print(
                    f"| {i + 1} | {reused[2]} | {1000 * reused[0]:.1f} | {reused[1]} | "
                    f"{1000 * recomputed[0]:.1f} | {recomputed[1]} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
