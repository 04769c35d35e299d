"""`--mode memory`: peak memory of one prefill, with and without chunked prefill, each in a fresh process.

A process's peak RSS is a high-water mark that never goes down, so every measurement runs in its own
subprocess (`python -m tokensieve.bench.memory`): load the model, build the prompt, note the resident
memory, reset the high-water mark (Linux: `/proc/self/clear_refs`; elsewhere the peak since the process
began stands), prefill (`engine.start(prompt, method=..., prefill_chunk=...)`, or `transformers`' forward
pass), read the peak. On CPU the peak is `resource.getrusage(RUSAGE_SELF).ru_maxrss`; on CUDA it is
`torch.cuda.max_memory_allocated`, reset just before the prefill. The prefill's own peak is the peak minus
what was resident before it (the weights, the prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import render
from .runner import DENSE, TRANSFORMERS, build_prompt, contestants, peak_rss_bytes

MODEL_OPTIONS = ("model", "device", "dtype", "threads", "method_defaults")


def measure_memory(args: argparse.Namespace, methods: Sequence[str], lengths: Sequence[int], chunk: int):
    """One fresh process per contestant, length and chunk setting (`transformers` unchunked only)."""
    rows = []
    for length in lengths:
        for name in contestants(methods):
            for setting in (None,) if name == TRANSFORMERS else (None, chunk):
                rows.append(_probe(args, name, length, setting))
    return rows


def _probe(args: argparse.Namespace, name: str, length: int, chunk: int | None) -> dict[str, Any]:
    options = {key: getattr(args, key, None) for key in MODEL_OPTIONS}
    request = json.dumps({**options, "method": name, "length": length, "chunk": chunk})
    package_root = str(Path(__file__).resolve().parents[2])  # this tree's tokensieve, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "tokensieve.bench.memory", request], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"the memory probe for {name} at {length} tokens failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe(request: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the peak memory before and after one prefill."""
    import torch

    from ..commands.options import load_engine

    engine = load_engine(argparse.Namespace(**{key: request[key] for key in MODEL_OPTIONS}))
    device = engine.model.device
    prompt = build_prompt(engine.tokenizer, request["length"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _reset_peak_rss()
    start = time.perf_counter()
    kv_bytes = _prefill(engine, request["method"], prompt, request["chunk"])
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return {
        "method": request["method"],
        "length": request["length"],
        "prefill_chunk": request["chunk"],
        "measure": "peak allocated (CUDA)" if device.type == "cuda" else "peak RSS",
        "before_prefill_bytes": before,
        "peak_bytes": peak,
        "prefill_peak_bytes": peak - before,
        "kv_bytes_reserved": kv_bytes,
        "prefill_s": seconds,
    }


def _prefill(engine, name: str, prompt: list[int], chunk: int | None) -> int | None:
    """Prefill `prompt`; the device bytes reserved for KV afterwards (None for `transformers`)."""
    import torch

    if name == TRANSFORMERS:
        from transformers import DynamicCache

        ids = torch.tensor([prompt], device=engine.model.device)
        with torch.inference_mode():
            engine.model.hf(input_ids=ids, past_key_values=DynamicCache(config=engine.model.hf.config), use_cache=True)
        return None
    session = engine.start(prompt, method=name, prefill_chunk=chunk)
    return session.stats.kv_bytes_reserved


def _reset_peak_rss() -> int:
    """Resident bytes now, with the peak-RSS high-water mark reset to it where Linux allows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return peak_rss_bytes()


def memory_table(rows: Sequence[dict[str, Any]]) -> str:
    """Peak memory per contestant, length and chunk setting, and the chunked prefill's saving."""
    mib = 2**20

    def _mib(value: int | None) -> str:
        return "-" if value is None else f"{value / mib:.0f}"

    unchunked = {(r["method"], r["length"]): r["prefill_peak_bytes"] for r in rows if r["prefill_chunk"] is None}
    lines = [("method", "tokens", "chunk", "peak MiB", "prefill peak MiB", "vs unchunked", "KV MiB", "prefill s")]
    for r in rows:
        base = unchunked[r["method"], r["length"]]
        lines.append(
            (r["method"], r["length"], r["prefill_chunk"] or "-", f"{r['peak_bytes'] / mib:.0f}")
            + (f"{r['prefill_peak_bytes'] / mib:.0f}", f"{r['prefill_peak_bytes'] / base:.2f}x" if base else "-")
            + (_mib(r["kv_bytes_reserved"]), f"{r['prefill_s']:.1f}")
        )
    measure = rows[0]["measure"] if rows else "peak RSS"
    return f"Memory of one prefill ({measure}, one fresh process each; {DENSE} = our dense path)\n{render(lines)}"


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
