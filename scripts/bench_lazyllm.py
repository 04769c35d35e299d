"""LazyLLM side by side with our dense path and `transformers` on the `cpu-prefill` preset.

Same process, same prompt, same threads; one warm-up each; the contestants alternate order from one
repeat to the next; medians of the repeats. Prints a markdown table (pasted into docs/methods/lazyllm.md)
and writes the samples as JSON.

    .venv/bin/python scripts/bench_lazyllm.py --lengths 4096,8192 --repeats 3
    .venv/bin/python scripts/bench_lazyllm.py --lengths 4096 --keep 0.7,0.5,0.3 --keep 0.6,0.4,0.2 --static
    .venv/bin/python scripts/bench_lazyllm.py --lengths 8192 --revive-per-step 0,1,4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import tokensieve
from tokensieve import presets
from tokensieve.bench.costs import ideal_prefill_speedup
from tokensieve.bench.report import machine
from tokensieve.bench.runner import DENSE, TRANSFORMERS, build_prompt, run_once
from tokensieve.methods import LazyLLM


def contestants(keeps: list[tuple[float, ...]], static: bool, budgets: list[int]) -> dict[str, object]:
    """Label -> what `run_once` runs: `transformers`, our dense path, and each LazyLLM schedule (and budget)."""
    runs: dict[str, object] = {TRANSFORMERS: TRANSFORMERS, DENSE: DENSE}
    for keep in keeps:
        runs[f"lazyllm {keep}"] = LazyLLM(keep=keep)
        for budget in budgets:
            runs[f"lazyllm {keep} revive<={budget}"] = LazyLLM(keep=keep, revive_per_step=budget)
        if static:
            runs[f"lazyllm {keep} static"] = LazyLLM(keep=keep, revive=False)
    return runs


def measure(engine, runs: dict[str, object], length: int, new_tokens: int, repeats: int):
    """Samples per contestant, and the process CPU seconds of each run (with one thread, a measure of the
    work done that a crowded machine's scheduling does not inflate)."""
    prompt = build_prompt(engine.tokenizer, length)
    samples: dict[str, list] = {label: [] for label in runs}
    cpu: dict[str, list[float]] = {label: [] for label in runs}
    for repeat in range(repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for label in order:
            start = time.process_time()
            samples[label].append(run_once(engine, runs[label], prompt, new_tokens))
            cpu[label].append(time.process_time() - start)
            sample = samples[label][-1]
            print(f"  {length} #{repeat} {label}: TTFT {sample.ttft_s:.2f} s, e2e {sample.e2e_s:.2f} s", flush=True)
    return samples, cpu


def summarise(engine, length: int, samples: dict[str, list], cpu: dict[str, list[float]]) -> list[dict]:
    def median(label, field):
        return statistics.median(getattr(s, field) for s in samples[label])

    spec = engine.model.spec
    rows = []
    for label, runs in samples.items():
        row = {
            "length": length,
            "contestant": label,
            "ttft_s": median(label, "ttft_s"),
            "e2e_s": median(label, "e2e_s"),
            "tpot_s": median(label, "tpot_s"),
            "ttft_vs_transformers": median(TRANSFORMERS, "ttft_s") / median(label, "ttft_s"),
            "ttft_vs_dense": median(DENSE, "ttft_s") / median(label, "ttft_s"),
            "e2e_vs_transformers": median(TRANSFORMERS, "e2e_s") / median(label, "e2e_s"),
            "e2e_vs_dense": median(DENSE, "e2e_s") / median(label, "e2e_s"),
            "tpot_vs_dense": median(DENSE, "tpot_s") / median(label, "tpot_s"),
            "e2e_cpu_s": statistics.median(cpu[label]),
            "e2e_cpu_vs_dense": statistics.median(cpu[DENSE]) / statistics.median(cpu[label]),
        }
        stats = runs[0].stats
        if stats is not None and label.startswith("lazyllm"):
            ideal = ideal_prefill_speedup(spec, stats)
            row.update(
                prefill_computed_pct=100 * stats.prefill_fraction,
                prompt_computed_pct=stats.method_stats["prompt_computed_pct"],
                revived_per_step=stats.method_stats["revived_per_step"],
                deferred_per_step=stats.method_stats["revivals_deferred_per_step"],
                ideal_prefill_speedup=ideal,
                ttft_of_ideal=row["ttft_vs_dense"] / ideal,
            )
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    columns = [
        ("tokens", lambda r: str(r["length"])),
        ("contestant", lambda r: r["contestant"]),
        ("TTFT s", lambda r: f"{r['ttft_s']:.2f}"),
        ("TTFT vs HF", lambda r: f"{r['ttft_vs_transformers']:.2f}x"),
        ("TTFT vs dense", lambda r: f"{r['ttft_vs_dense']:.2f}x"),
        ("ideal (FLOPs)", lambda r: f"{r['ideal_prefill_speedup']:.2f}x"),
        ("of ideal", lambda r: f"{r['ttft_of_ideal']:.0%}"),
        ("e2e s", lambda r: f"{r['e2e_s']:.2f}"),
        ("e2e vs HF", lambda r: f"{r['e2e_vs_transformers']:.2f}x"),
        ("e2e vs dense", lambda r: f"{r['e2e_vs_dense']:.2f}x"),
        ("TPOT vs dense", lambda r: f"{r['tpot_vs_dense']:.2f}x"),
        ("e2e CPU vs dense", lambda r: f"{r['e2e_cpu_vs_dense']:.2f}x"),
        ("prefill computed", lambda r: f"{r['prefill_computed_pct']:.1f}%"),
        ("prompt computed (Table 2)", lambda r: f"{r['prompt_computed_pct']:.1f}%"),
        ("revived/step", lambda r: f"{r['revived_per_step']:.0f}"),
        ("deferred/step", lambda r: f"{r['deferred_per_step']:.0f}"),
    ]

    def cell(fn, row):
        try:
            return fn(row)
        except KeyError:  # LazyLLM-only columns
            return ""

    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(fn, r) for _, fn in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192", help="prompt lengths in tokens (default: 4096,8192)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="append", help="a keep schedule, e.g. 0.7,0.5,0.3 (repeatable: a sweep)")
    parser.add_argument("--static", action="store_true", help="also run each schedule with revive=False")
    parser.add_argument("--revive-per-step", default="", help="revival budgets to add, e.g. 0,1,4 (default: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-lazyllm.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    keeps = [tuple(float(x) for x in k.split(",")) for k in args.keep or ["0.7,0.5,0.3"]]
    model, tokenizer = presets.build("cpu-prefill")
    engine = tokensieve.load(model, tokenizer=tokenizer, device="cpu", dtype="float32")
    budgets = [int(x) for x in args.revive_per_step.split(",") if x]
    runs = contestants(keeps, args.static, budgets)
    warmup = build_prompt(tokenizer, 256)
    for run in runs.values():
        run_once(engine, run, warmup, 2)

    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        rows += summarise(engine, length, *measure(engine, runs, length, args.new_tokens, args.repeats))
    print(table(rows))
    config = dict(preset="cpu-prefill", new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
    Path(args.out).write_text(json.dumps({"machine": machine(engine), "config": config, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
