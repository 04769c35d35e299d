"""The modes of `tokensieve bench`: what each measures, its checks (before any model loads) and its output.

- `e2e` (default): whole generations; TTFT, TPOT and end-to-end against the FLOP, byte and combined ideal.
- `ttft`: prefill only (one new token per run), against the FLOP ideal.
- `decode`: TPOT at each length after an untimed prefill, against the byte ideal (`decode.py`).
- `multi-turn`: each turn of a conversation by `session.extend` vs recomputed (`turns.py`).
- `memory`: peak memory of one prefill with and without `--prefill-chunk`, fresh processes (`memory.py`).
- `batch`: decode throughput and TPOT per sequence at each `--batch` size (`batch.py`).
With `--tensor-parallel-size N`, e2e compares each method on N ranks with 1 rank instead (`parallel.py`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

MODES = ("e2e", "ttft", "decode", "multi-turn", "memory", "batch")
DEFAULT_NEW_TOKENS = {
    "e2e": 32,
    "decode": 16,
    "multi-turn": 16,
    "batch": 16,
}  # ttft and memory generate no more than one


def new_tokens(args: argparse.Namespace) -> int:
    """The tokens each run of `args.mode` generates (decode: steps per round) after its prompt."""
    return args.new_tokens or DEFAULT_NEW_TOKENS.get(args.mode, 1)


def check(args: argparse.Namespace) -> None:
    """Settings a mode cannot use are an error naming the option, before the model loads (argparse has
    already refused non-positive `--repeats` and `--turns`)."""
    least = {"e2e": 2, "decode": 1, "multi-turn": 1, "batch": 2}.get(args.mode, 0)
    if args.new_tokens is not None and args.new_tokens < least:
        raise ValueError(f"--new-tokens must be >= {least} in --mode {args.mode}, got {args.new_tokens}")
    if args.document is not None and not Path(args.document).is_file():
        raise ValueError(f"--document {args.document}: no such file (give a text file or a JSON {{'text': ...}})")
    if args.mode == "batch":
        batch_sizes(args)
    if getattr(args, "tensor_parallel_size", 1) > 1 and args.mode != "e2e":
        raise ValueError(
            "--tensor-parallel-size compares N ranks with 1 in whole generations (--mode e2e), "
            f"not in --mode {args.mode}"
        )
    if args.mode == "memory" and args.prefill_chunk is None:
        raise ValueError("--mode memory compares a prefill with and without chunks: give --prefill-chunk N (N >= 1)")


def batch_sizes(args: argparse.Namespace) -> list[int]:
    """`--batch 1,4,16` as sizes, each an int >= 1."""
    try:
        sizes = sorted({int(item) for item in args.batch.split(",") if item.strip()})
    except ValueError:
        raise ValueError(f"--batch takes batch sizes like 1,4,16, got {args.batch!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--batch sizes must be ints >= 1, got {args.batch!r}")
    return sizes


def run(args: argparse.Namespace, methods: list[str], lengths: list[int], load_engine) -> tuple[Path, str]:
    """Measure in `args.mode`; write `bench.json` (e2e) or `bench-<mode>.json` into `--out`; return it and
    the table."""
    from . import report

    config = {"mode": args.mode, "model": args.model, "methods": methods, "lengths": lengths}
    config |= {"repeats": args.repeats, "threads": args.threads, "prefill_chunk": args.prefill_chunk}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("bench.json" if args.mode == "e2e" else f"bench-{args.mode}.json")
    if args.mode == "memory":
        from . import memory

        rows = memory.measure_memory(args, methods, lengths, args.prefill_chunk)
        _write(path, report.machine(_device(args.device), args.dtype or "default"), config, None, rows)
        return path, memory.memory_table(rows)
    if getattr(args, "tensor_parallel_size", 1) > 1:
        from .parallel import measure_parallel, parallel_table

        rows, settings = measure_parallel(args, load_engine, methods, lengths, new_tokens(args))
        _write(path.with_name("bench-parallel.json"), report.machine(_device(args.device), args.dtype or "default"),
               config | settings, None, rows)  # fmt: skip
        return path.with_name("bench-parallel.json"), parallel_table(rows)
    engine = load_engine(args)
    rows, text, settings = _measure(engine, args, methods, lengths)
    # What each spec ran as: with a model's method defaults a bare name stands for its measured settings.
    settings["method_settings"] = {spec: engine.resolve(spec).settings() for spec in methods}
    about = report.machine(engine.model.device, engine.model.dtype)
    _write(path, about, config | settings, engine.model.spec, rows)
    return path, text


def _measure(engine, args: argparse.Namespace, methods: list[str], lengths: list[int]):
    """(rows, table, mode settings) of an engine-based mode."""
    from . import report, runner

    progress = not args.no_progress
    if args.mode == "batch":
        from .batch import batch_table, measure_batch

        sizes, generated = batch_sizes(args), new_tokens(args)
        rows = measure_batch(engine, methods, lengths, sizes, generated, args.repeats, args.shared_prompt)
        return rows, batch_table(rows), {"batch": sizes, "new_tokens": generated, "shared_prompt": args.shared_prompt}
    if args.mode == "decode":
        from .decode import decode_table, measure_decode

        steps = new_tokens(args)
        rows = measure_decode(engine, methods, lengths, steps=steps, repeats=args.repeats, progress=progress)
        return rows, decode_table(rows), {"steps": steps}
    if args.mode == "multi-turn":
        from .turns import measure_turns, turns_table

        answer_tokens, rows = new_tokens(args), []
        for length in lengths:
            rows += measure_turns(
                engine, methods or ["omnikv"], length, turns=args.turns, new_tokens=answer_tokens,
                repeats=args.repeats, document=args.document,
            )  # fmt: skip
        settings = {"turns": args.turns, "new_tokens": answer_tokens, "document": args.document or "haystack sentences"}
        return rows, turns_table(rows), settings
    prompt = {"prompt": "haystack sentences then a question, tokenized to each length"}
    if args.mode == "ttft":
        series = runner.measure_ttft(engine, methods, lengths, repeats=args.repeats, progress=progress)
        rows = report.records(series, engine)
        return rows, report.table(rows, prefill_only=True), prompt
    generated = new_tokens(args)
    series = runner.measure(engine, methods, lengths, new_tokens=generated, repeats=args.repeats, progress=progress)
    rows = report.records(series, engine)
    return rows, report.table(rows), {"new_tokens": generated, **prompt}


def _write(path: Path, about: dict[str, Any], config: dict[str, Any], spec, rows: list[dict[str, Any]]) -> None:
    from dataclasses import asdict

    document = {"machine": about, "config": config, "model": asdict(spec) if spec else None, "results": rows}
    path.write_text(json.dumps(document, indent=2) + "\n")


def _device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
