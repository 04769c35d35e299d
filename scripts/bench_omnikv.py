"""TPOT of OmniKV (offload on and off) vs our dense path vs `transformers`, with the byte model's ideal.

    python scripts/bench_omnikv.py                                   # cpu-decode preset, 2K..16K tokens
    python scripts/bench_omnikv.py --model tiny --lengths 512 --rounds 1 --steps 2

Decode is bound by bytes: every step reads the weights once plus the keys and values it attends to. The
`cpu-decode` preset (32 layers, hidden 256, one KV head) reads more KV than weights per step from about
4K tokens on, the regime where OmniKV can pay off. OmniKV runs with the paper's filter layers 2, 8, 18 and
a budget of 0.067 of the prompt (`--budget`).

Prefill is not what is measured, and at 16K it costs minutes on a CPU, so one prompt of the longest length
is prefilled once with our dense path. Attention is causal, so the first n entries of that KV are exactly
what a prefill of the first n tokens computes: each length starts from a copy of that prefix, decoding the
prompt's token n at position n first. OmniKV's prefill is dense, so its policy gets exactly the
`prefill_layer_done` calls the engine would make (moving the sparse layers' prompt KV to its host store),
and `transformers` gets a `DynamicCache` holding the same keys and values (our dense path equals
transformers: checked on the decoded tokens). Then, in rounds
with a rotating order, each contestant decodes `--steps` tokens; the table gives the median over rounds of
the mean step time, and ratios against our dense path measured in the same rounds.
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
from transformers import DynamicCache

import tokensieve
from tokensieve import presets
from tokensieve.bench.costs import decode_bytes, weight_bytes
from tokensieve.cache import LayerKV
from tokensieve.generation import Stats
from tokensieve.methods import Method, OmniKV, Policy, Run

CONTESTANTS = ("transformers", "dense", "omnikv", "omnikv-no-offload")


class OurDecoder:
    """A generation on our engine that starts from a copy of a dense prefill's KV."""

    def __init__(self, engine: tokensieve.Engine, method: Method, cache: list[tuple], token: int):
        model = engine.model
        prompt_len = len(cache[0][2])
        self.engine, self.token, self.position = engine, token, prompt_len
        run = Run(model.spec, prompt_len, 10_000, model.device, model.dtype, model.scale)
        self.policy = method.start(run)
        self.kv = []
        for layer, (keys, values, positions) in enumerate(cache):
            copy = LayerKV(model.spec.num_kv_heads, model.spec.head_dim, model.dtype, model.device)
            copy.append(keys, values, positions, reserve=256)
            self.policy.prefill_layer_done(layer, copy)  # what the engine calls after each prefill layer
            self.kv.append(copy)
        self.keys_attended = [0] * model.spec.num_layers
        self.steps = 0
        self.tokens: list[int] = []

    def step(self) -> None:
        # The engine's own decode step (the public API would prefill again on every call).
        logits = self.engine._decode(self.token, self.position, self.kv, self.policy, self.keys_attended)
        self.token, self.position, self.steps = int(logits.argmax()), self.position + 1, self.steps + 1
        self.tokens.append(self.token)


class HFDecoder:
    """`transformers` decoding one token at a time from a DynamicCache holding the same prompt KV."""

    def __init__(self, hf_model, cache: list[tuple], token: int):
        self.model, self.token, self.position = hf_model, token, len(cache[0][2])
        self.cache = DynamicCache(config=hf_model.config)
        for layer, (keys, values, _) in enumerate(cache):
            self.cache.update(keys[None].clone(), values[None].clone(), layer)
        self.tokens: list[int] = []

    def step(self) -> None:
        ids = torch.tensor([[self.token]])
        out = self.model(input_ids=ids, past_key_values=self.cache, cache_position=torch.tensor([self.position]))
        self.token, self.position = int(out.logits[0, -1].argmax()), self.position + 1
        self.tokens.append(self.token)


def prefill(engine: tokensieve.Engine, length: int) -> tuple[list[LayerKV], list[int]]:
    """Dense prefill of a random prompt of `length` tokens: the per-layer KV and the prompt."""
    model = engine.model
    gen = torch.Generator().manual_seed(length)
    prompt = [presets.BOS_ID, *torch.randint(0, 256, (length - 1,), generator=gen).tolist()]
    run = Run(model.spec, length, 1, model.device, model.dtype, model.scale)
    kv, _ = engine._prefill(prompt, 1, Policy(run), Stats(method={"name": "dense"}))
    return kv, prompt


def prefix(kv: list[LayerKV], length: int) -> list[tuple]:
    """Keys, values and positions of the first `length` entries of every layer (views, not copies)."""
    return [(layer.keys[:, :length], layer.values[:, :length], layer.positions[:length]) for layer in kv]


def bench(engine: tokensieve.Engine, kv: list[LayerKV], prompt: list[int], length: int, args) -> dict:
    cache, token = prefix(kv, length), prompt[length]
    decoders = {
        "transformers": HFDecoder(engine.model.hf, cache, token),
        "dense": OurDecoder(engine, Method(), cache, token),
        "omnikv": OurDecoder(engine, OmniKV(budget=args.budget), cache, token),
        "omnikv-no-offload": OurDecoder(engine, OmniKV(budget=args.budget, offload=False), cache, token),
    }
    times: dict[str, list[float]] = {name: [] for name in CONTESTANTS}
    for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
        shift = round_ % len(CONTESTANTS)
        for name in CONTESTANTS[shift:] + CONTESTANTS[:shift]:
            tick = time.perf_counter()
            for _ in range(args.steps):
                decoders[name].step()
            if round_ > 0:
                times[name].append((time.perf_counter() - tick) / args.steps)
        print(f"{length} round {round_}: " + ", ".join(f"{n} {t[-1] * 1e3:.1f} ms" for n, t in times.items() if t))
    if decoders["transformers"].tokens != decoders["dense"].tokens:
        raise RuntimeError("our dense path and transformers decoded different tokens from the same KV")
    return summarize(engine, length, times, decoders)


def summarize(engine: tokensieve.Engine, length: int, times: dict, decoders: dict) -> dict:
    spec, dtype = engine.model.spec, engine.model.dtype
    tpot = {name: statistics.median(values) for name, values in times.items()}
    dense_keys = [length + (decoders["dense"].steps + 1) / 2] * spec.num_layers
    dense_bytes = decode_bytes(spec, dtype, dense_keys)
    row = {
        "context": length,
        "kv_over_weight_bytes": (dense_bytes - weight_bytes(spec, dtype)) / weight_bytes(spec, dtype),
        "tpot_ms": {name: t * 1e3 for name, t in tpot.items()},
        "speedup_vs_dense": {name: tpot["dense"] / t for name, t in tpot.items()},
        "ideal_speedup": {},
        "rounds_ms": {name: [t * 1e3 for t in values] for name, values in times.items()},
    }
    for name in ("omnikv", "omnikv-no-offload"):
        decoder = decoders[name]
        keys = [k / decoder.steps for k in decoder.keys_attended]
        host = decoder.policy.bytes_loaded / max(1, decoder.policy.steps)
        row["ideal_speedup"][name] = dense_bytes / decode_bytes(spec, dtype, keys, host)
        row["budget_tokens"] = decoder.policy.budget
    return row


def crossover(rows: list[dict], name: str) -> str:
    """Each length's verdict against our dense path, shortest first."""
    return ", ".join(f"{r['context']}: {'faster' if r['speedup_vs_dense'][name] > 1 else 'slower'}" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cpu-decode", help="a preset (random weights)")
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--budget", type=float, default=0.067, help="fraction of the prompt (or >= 1: tokens)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="decode steps per contestant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_omnikv.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.budget = int(args.budget) if args.budget >= 1 else args.budget
    lengths = sorted(int(x) for x in args.lengths.split(","))
    model, tokenizer = presets.build(args.model, max_positions=max(lengths) + 1024)
    engine = tokensieve.load(model, tokenizer=tokenizer, device="cpu", dtype="float32")
    load_before = os.getloadavg()
    with torch.inference_mode():
        start = time.perf_counter()
        kv, prompt = prefill(engine, max(lengths) + 1)
        print(f"prefill of {len(prompt)} tokens: {time.perf_counter() - start:.0f} s", flush=True)
        rows = [bench(engine, kv, prompt, length, args) for length in lengths]
    report = {
        "model": args.model,
        "budget": args.budget,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_average_before_after": [load_before, os.getloadavg()],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "rows": rows,
        "crossover": {name: crossover(rows, name) for name in ("omnikv", "omnikv-no-offload")},
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(rows))
    for name, text in report["crossover"].items():
        print(f"{name} vs our dense: {text}")


def table(rows: list[dict]) -> str:
    lines = [
        "| context | budget | KV/weight bytes | transformers ms | dense ms | OmniKV ms (x dense, ideal) "
        "| OmniKV no-offload ms (x dense, ideal) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, s, ideal = r["tpot_ms"], r["speedup_vs_dense"], r["ideal_speedup"]
        lines.append(
            f"| {r['context']} | {r['budget_tokens']} | {r['kv_over_weight_bytes']:.2f} | {t['transformers']:.1f} "
            f"| {t['dense']:.1f} | {t['omnikv']:.1f} ({s['omnikv']:.2f}x, {ideal['omnikv']:.2f}x) "
            f"| {t['omnikv-no-offload']:.1f} ({s['omnikv-no-offload']:.2f}x, {ideal['omnikv-no-offload']:.2f}x) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
