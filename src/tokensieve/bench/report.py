"""Results: one record per (method, length) with medians, spreads, speedups and the ideal; table, JSON, plots.

Speedups are ratios of medians, baseline over contestant (above 1 = faster). "of ideal" is the measured
speedup vs `transformers` over the ideal speedup of the cost model (`costs`): 100% means the method turns
every FLOP (prefill) or byte (decode) it skips into time saved against the reference implementation.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..engine import Engine
from . import costs
from .runner import DENSE, TRANSFORMERS, Series

TIMES = ("ttft_s", "tpot_s", "e2e_s")


def records(series: Sequence[Series], engine: Engine) -> list[dict[str, Any]]:
    """One JSON-ready record per series: timings, speedups vs `transformers` and our dense, ideal, memory."""
    spec, dtype = engine.model.spec, engine.model.dtype
    medians = {(s.method, s.length): {t: _median(s, t) for t in TIMES} for s in series}
    out = []
    for s in series:
        own, hf = medians[s.method, s.length], medians[TRANSFORMERS, s.length]
        vs_hf = {t: _ratio(hf[t], own[t]) for t in TIMES}
        vs_dense = {t: _ratio(medians[DENSE, s.length][t], own[t]) for t in TIMES}
        stats = s.samples[0].stats
        ideal = {
            "prefill": costs.ideal_prefill_speedup(spec, stats) if stats else 1.0,
            "decode": costs.ideal_decode_speedup(spec, dtype, stats) if stats else 1.0,
        }
        hf_decode_s = hf["e2e_s"] - hf["ttft_s"]
        ideal["e2e"] = costs.ideal_e2e_speedup(hf["ttft_s"], hf_decode_s, ideal["prefill"], ideal["decode"])
        last = s.samples[-1]
        out.append(
            {
                "method": s.method,
                "length": s.length,
                "repeats": len(s.samples),
                "new_tokens": last.new_tokens,
                **{t: _spread(s, t) for t in TIMES},
                "speedup_vs_transformers": {t[:-2]: vs_hf[t] for t in TIMES},
                "speedup_vs_dense": {t[:-2]: vs_dense[t] for t in TIMES},
                "ideal_speedup": ideal,
                "of_ideal": {
                    phase: _ratio(vs_hf[time], ideal[phase])
                    for phase, time in (("prefill", "ttft_s"), ("decode", "tpot_s"), ("e2e", "e2e_s"))
                },
                "memory": {
                    "peak_device_bytes": max((x.peak_device_bytes or 0) for x in s.samples) or None,
                    "peak_rss_bytes": last.peak_rss_bytes,
                    "kv_bytes_device": stats.kv_bytes_device if stats else None,
                    "kv_bytes_host": stats.kv_bytes_host if stats else None,
                },
                "stats": stats.to_dict() if stats else None,
            }
        )
    return out


def machine(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Where and with what the numbers were taken (the load average: how busy the machine was at the end)."""
    import transformers

    from .. import __version__

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokensieve": __version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
    }


def table(rows: Sequence[dict[str, Any]], prefill_only: bool = False) -> str:
    """Plain-text tables: prefill (TTFT), then (unless `prefill_only`) decode (TPOT), end-to-end and memory."""
    prefill = [("method", "tokens", "TTFT ms [min-max]", "x HF", "x dense", "ideal", "of ideal")]
    decode = [("method", "tokens", "TPOT ms [min-max]", "x HF", "x dense", "ideal", "of ideal")]
    decode[0] += ("e2e ms", "x HF", "x dense", "ideal", "of ideal")
    on_device = any(r["memory"]["peak_device_bytes"] for r in rows)
    decode[0] += ("peak alloc MiB" if on_device else "peak RSS MiB", "KV dev/host MiB")
    for r in rows:
        prefill.append((r["method"], r["length"], ms(r["ttft_s"]), *_versus(r, "ttft", "prefill")))
        decode.append(
            (r["method"], r["length"], ms(r["tpot_s"]), *_versus(r, "tpot", "decode"))
            + (f"{r['e2e_s']['median'] * 1e3:.0f}", *_versus(r, "e2e", "e2e"))
            + (_memory(r["memory"]), _kv(r["memory"]))
        )
    if prefill_only:
        return f"Prefill\n{render(prefill)}"
    return f"Prefill\n{render(prefill)}\n\nDecode, end-to-end, memory\n{render(decode)}"


def _versus(r: dict[str, Any], time: str, phase: str) -> tuple[str, str, str, str]:
    """x HF, x dense, ideal and of-ideal cells of one timing."""
    hf, dense = r["speedup_vs_transformers"][time], r["speedup_vs_dense"][time]
    return x(hf), x(dense), x(r["ideal_speedup"][phase]), _pct(r["of_ideal"][phase])


def load_accuracy(path: Path) -> dict[str, float]:
    """Accuracy per method from an eval results file.

    Accepted: `{"method": accuracy, ...}`, or a list of records `{"method": ..., "accuracy": ...}` (several
    records of one method, e.g. one per task, are averaged), or such a list under a `"results"` key.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): pass the results file of `tokensieve eval`") from err
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        data = data["results"]
    if isinstance(data, dict) and all(isinstance(v, (int, float)) for v in data.values()):
        return {str(k): float(v) for k, v in data.items()}
    if isinstance(data, list) and all(isinstance(r, dict) and {"method", "accuracy"} <= r.keys() for r in data):
        scores: dict[str, list[float]] = {}
        for r in data:
            scores.setdefault(str(r["method"]), []).append(float(r["accuracy"]))
        return {name: statistics.mean(values) for name, values in scores.items()}
    raise ValueError(
        f"{path}: expected {{method: accuracy}} or a list of records with 'method' and 'accuracy' "
        "(optionally under a 'results' key)"
    )


def _median(s: Series, time: str) -> float:
    return statistics.median(getattr(x, time) for x in s.samples)


def _spread(s: Series, time: str) -> dict[str, float]:
    return spread([getattr(x, time) for x in s.samples])


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ratio(baseline: float, contestant: float) -> float | None:
    """baseline / contestant, None where either is not a time (TPOT of a one-token run)."""
    return baseline / contestant if baseline and contestant else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(rows: list[tuple]) -> str:
    """Rows as aligned columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    cells = (
        (str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )
    return "\n".join("  ".join(row) for row in cells)


def ms(times: dict[str, float]) -> str:
    """`median [min-max]` in milliseconds."""
    return f"{times['median'] * 1e3:.1f} [{times['min'] * 1e3:.1f}-{times['max'] * 1e3:.1f}]"


def x(value: float | None) -> str:
    """A speedup as `1.23x`, `-` where undefined."""
    return "-" if value is None else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _memory(memory: dict[str, Any]) -> str:
    peak = memory["peak_device_bytes"] or memory["peak_rss_bytes"]
    return f"{peak / 2**20:.0f}"


def _kv(memory: dict[str, Any]) -> str:
    if memory["kv_bytes_device"] is None:
        return "-"
    return f"{memory['kv_bytes_device'] / 2**20:.1f}/{memory['kv_bytes_host'] / 2**20:.1f}"
