"""A client-side load measurement of `tokensieve serve` against in-process `stream` at concurrency 1.

`python -m tokensieve.serve.load --model tiny --concurrency 1,4 --requests 16` serves the model from a
thread on a free loopback port, sends streaming completions `--concurrency` at a time, and prints per
method: requests/s, TTFT (send to first text piece) and TPOT ((last piece - first piece) / (tokens - 1))
percentiles, beside the same figures of in-process `engine.stream` one request at a time. Prompts are
fixed-length random byte strings, distinct per request, so nothing is reused between requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Load:
    """The timings of one run: what `row` summarizes."""

    label: str
    concurrency: int
    seconds: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)

    def add(self, sent: float, pieces: list[float], tokens: int) -> None:
        self.ttft_s.append(pieces[0] - sent)
        if tokens > 1:
            self.tpot_s.append((pieces[-1] - pieces[0]) / (tokens - 1))

    def row(self) -> str:
        ms = [1000 * np.percentile(values, q) for values in (self.ttft_s, self.tpot_s) for q in (50, 90)]
        rps = len(self.ttft_s) / self.seconds
        return f"| {self.label} | {self.concurrency} | {rps:.1f} | " + " | ".join(f"{v:.1f}" for v in ms) + " |"


COLUMNS = ("run", "concurrency", "requests/s", "TTFT p50 ms", "TTFT p90 ms", "TPOT p50 ms", "TPOT p90 ms")
HEADER = "| " + " | ".join(COLUMNS) + " |\n" + "|---" * len(COLUMNS) + "|"


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
        load.add(sent, pieces, stream.generation.stats.new_tokens)
    load.seconds = time.perf_counter() - start
    return load


async def through_server(url: str, model: str, texts: list[str], max_tokens: int, method: str, concurrency: int):
    import httpx

    load = Load(f"server, {method}", concurrency)
    gate = asyncio.Semaphore(concurrency)

    async def one(client, text: str) -> None:
        body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        body |= {"stream_options": {"include_usage": True}, "tokensieve": {"method": method, "reuse": False}}
        async with gate:
            sent, pieces, tokens = time.perf_counter(), [], 0
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        pieces.append(time.perf_counter())
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            load.add(sent, pieces, tokens)

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, text) for text in texts))
        load.seconds = time.perf_counter() - start
    return load


def main(argv: list[str] | None = None) -> None:
    from ..methods import split_methods
    from .app import create_app
    from .command import add_model_arguments, load_engine
    from .config import ServeConfig
    from .server import running

    parser = argparse.ArgumentParser(prog="python -m tokensieve.serve.load", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, default_model="tiny")
    parser.add_argument("--methods", default="dense", help="comma-separated method specs")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated client concurrencies")
    parser.add_argument("--requests", type=int, default=16, help="requests per run")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = load_engine(args)
    name = args.model
    app = create_app(engine, ServeConfig(model_name=name, max_waiting=max(levels), session_bytes=0))
    print(HEADER)
    with running(app) as (_, url):
        for method in split_methods(args.methods):
            texts = prompts(args.requests + 1, args.prompt_tokens)
            in_process(engine, texts[:1], args.max_tokens, method)  # warm-up
            print(in_process(engine, texts[1:], args.max_tokens, method).row(), flush=True)
            for level in levels:
                run = through_server(url, name, texts[1:], args.max_tokens, method, level)
                print(asyncio.run(run).row(), flush=True)


if __name__ == "__main__":
    main()
