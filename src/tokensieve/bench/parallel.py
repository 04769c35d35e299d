"""`tokensieve bench --tensor-parallel-size N`: each method on N ranks beside the same method on 1 rank.

Both engines live in this process at once (the N-rank one with N - 1 spawned workers) and run the same
prompt and method alternately, repeated; medians. The 1-rank engine gets N times the threads of one rank,
so both sides use the same cores: on a CPU the ideal is therefore 1.00x (the same work, split), and what
the ratio shows is what splitting costs (the all-reduces) or saves (smaller per-rank matmuls, caches).
The bytes each rank sends into all-reduces are counted where they happen (`collectives.Traffic`): the
model's partial sums and the methods' score reductions, per prefill and per decode step.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from tqdm import tqdm

from ..collectives import Traffic
from ..engine import Engine
from . import report, runner


def measure_parallel(
    args: argparse.Namespace, load_engine, methods: Sequence[str], lengths: Sequence[int], new_tokens: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows per (method, length), and what the run was (ranks, threads per rank, machine)."""
    size, threads = args.tensor_parallel_size, args.threads or 1
    torch.set_num_threads(threads)  # the spawned ranks take this process's thread count
    ranks = load_engine(argparse.Namespace(**{**vars(args), "threads": threads}))
    one = load_engine(argparse.Namespace(**{**vars(args), "threads": threads * size, "tensor_parallel_size": 1}))
    try:
        names = [runner.DENSE, *dict.fromkeys(m for m in methods if m.lower() != runner.DENSE)]
        runner.check_lengths(one, lengths, new_tokens, args.repeats)
        rows = []
        bar = tqdm(total=len(lengths) * len(names) * 2 * (args.repeats + 1), disable=args.no_progress, unit="run")
        for length in lengths:
            prompt = runner.build_prompt(one.tokenizer, length)
            for name in names:
                sides = {1: (one, threads * size), size: (ranks, threads)}
                samples = {n: [] for n in sides}
                for repeat in range(args.repeats + 1):  # the first round warms up and is not kept
                    for n in sides if repeat % 2 == 0 else reversed(sides):
                        engine, side_threads = sides[n]
                        torch.set_num_threads(side_threads)
                        sample = _run(engine, name, prompt, new_tokens)
                        if repeat:
                            samples[n].append(sample)
                        bar.update()
                rows.append(_row(name, length, size, samples[1], samples[size]))
        bar.close()
    finally:
        ranks.close()
    return rows, {"tensor_parallel_size": size, "threads_per_rank": threads, "threads_one_rank": threads * size}


def _run(engine: Engine, method: str, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """One generation; its TTFT, TPOT, tokens and the all-reduce bytes of its prefill and of each decode step."""
    traffic = engine.executor.group.traffic if engine.executor.group is not None else Traffic()
    before = Traffic(**asdict(traffic))
    session = engine.start(prompt, method=method)
    prefilled = Traffic(**asdict(traffic))
    generation = session.generate(max_new_tokens=new_tokens)
    session.close()
    steps = max(1, generation.stats.new_tokens - 1)  # the first token comes from the prefill's logits
    return {
        "ttft_s": generation.stats.ttft_s,
        "tpot_s": generation.stats.tpot_s,
        "tokens": generation.token_ids,
        "prefill_model_bytes": prefilled.model_bytes - before.model_bytes,
        "prefill_selection_bytes": prefilled.selection_bytes - before.selection_bytes,
        "step_model_bytes": (traffic.model_bytes - prefilled.model_bytes) / steps,
        "step_selection_bytes": (traffic.selection_bytes - prefilled.selection_bytes) / steps,
    }


def _row(method: str, length: int, size: int, one: list[dict], ranks: list[dict]) -> dict[str, Any]:
    def median(samples: list[dict], key: str) -> float:
        return statistics.median(s[key] for s in samples)

    row: dict[str, Any] = {"method": method, "length": length, "tensor_parallel_size": size}
    for key in ("ttft_s", "tpot_s"):
        row[f"{key}_one_rank"] = report.spread([s[key] for s in one])
        row[f"{key}_ranks"] = report.spread([s[key] for s in ranks])
        row[f"{key.split('_')[0]}_ratio"] = median(one, key) / max(1e-12, median(ranks, key))
    for key in ("prefill_model_bytes", "prefill_selection_bytes", "step_model_bytes", "step_selection_bytes"):
        row[key] = median(ranks, key)
    row["same_tokens"] = all(a["tokens"] == b["tokens"] for a, b in zip(one, ranks, strict=True))
    return row


def parallel_table(rows: Sequence[dict[str, Any]]) -> str:
    """TTFT and TPOT on 1 rank and on N (medians [min-max], ms), their ratio (ideal 1.00x on the same
    cores), and what one rank sends into all-reduces."""
    size = rows[0]["tensor_parallel_size"] if rows else 2
    header = ("method", "length", "TTFT 1 rank", f"TTFT {size} ranks", "1/N", "TPOT 1 rank", f"TPOT {size} ranks",
              "1/N", "model KiB/step", "selection KiB/step", "prefill MiB (model+sel.)", "same tokens")  # fmt: skip
    lines = [header]
    for r in rows:
        prefill = (r["prefill_model_bytes"] + r["prefill_selection_bytes"]) / 2**20
        lines.append((
            r["method"], r["length"], report.ms(r["ttft_s_one_rank"]), report.ms(r["ttft_s_ranks"]),
            report.x(r["ttft_ratio"]), report.ms(r["tpot_s_one_rank"]), report.ms(r["tpot_s_ranks"]),
            report.x(r["tpot_ratio"]), f"{r['step_model_bytes'] / 1024:.1f}",
            f"{r['step_selection_bytes'] / 1024:.2f}", f"{prefill:.2f}", "yes" if r["same_tokens"] else "NO",
        ))  # fmt: skip
    note = "ratios: 1 rank / N ranks (above 1: N ranks faster); ideal 1.00x on a CPU, where both use the same cores"
    return report.render(lines) + "\n" + note
