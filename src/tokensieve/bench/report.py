"""Results: one record per (method, length) with medians, spreads, speedups and the ideal; table, JSON, plots.

Speedups are ratios of medians, baseline over contestant (above 1 = faster). "of ideal" is the measured
speedup vs `transformers` over the ideal speedup of the cost model (`costs`): 100% means the method turns
every FLOP (prefill) or byte (decode) it skips into time saved against the reference implementation.
"""

from __future__ import annotations

import datetime
import json
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
        own = medians[s.method, s.length]
        vs_hf = {t: medians[TRANSFORMERS, s.length][t] / own[t] for t in TIMES}
        vs_dense = {t: medians[DENSE, s.length][t] / own[t] for t in TIMES}
        stats = s.samples[0].stats
        ideal_prefill = costs.ideal_prefill_speedup(spec, stats) if stats else 1.0
        ideal_decode = costs.ideal_decode_speedup(spec, dtype, stats) if stats else 1.0
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
                "ideal_speedup": {"prefill": ideal_prefill, "decode": ideal_decode},
                "of_ideal": {
                    "prefill": vs_hf["ttft_s"] / ideal_prefill,
                    "decode": vs_hf["tpot_s"] / ideal_decode if ideal_decode else None,
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


def machine(engine: Engine) -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    import transformers

    from .. import __version__

    device = engine.model.device
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokensieve": __version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(engine.model.dtype).removeprefix("torch."),
    }


def write_json(path: Path, engine: Engine, config: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from dataclasses import asdict

    document = {"machine": machine(engine), "config": config, "model": asdict(engine.model.spec), "results": rows}
    path.write_text(json.dumps(document, indent=2) + "\n")


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Two plain-text tables: prefill (TTFT) and decode (TPOT), end-to-end and memory."""
    prefill = [("method", "tokens", "TTFT ms [min-max]", "x HF", "x dense", "ideal", "of ideal")]
    decode = [("method", "tokens", "TPOT ms [min-max]", "x HF", "x dense", "ideal", "of ideal", "e2e ms", "x HF")]
    on_device = any(r["memory"]["peak_device_bytes"] for r in rows)
    decode[0] += ("peak alloc MiB" if on_device else "peak RSS MiB", "KV dev/host MiB")
    for r in rows:
        hf, dense, ideal, of = r["speedup_vs_transformers"], r["speedup_vs_dense"], r["ideal_speedup"], r["of_ideal"]
        prefill.append(
            (r["method"], r["length"], _ms(r["ttft_s"]), _x(hf["ttft"]), _x(dense["ttft"]))
            + (_x(ideal["prefill"]), _pct(of["prefill"]))
        )
        decode.append(
            (r["method"], r["length"], _ms(r["tpot_s"]), _x(hf["tpot"]), _x(dense["tpot"]))
            + (_x(ideal["decode"]), _pct(of["decode"]), f"{r['e2e_s']['median'] * 1e3:.0f}", _x(hf["e2e"]))
            + (_memory(r["memory"]), _kv(r["memory"]))
        )
    return f"Prefill\n{_render(prefill)}\n\nDecode, end-to-end, memory\n{_render(decode)}"


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


def plot_speedups(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """TTFT and TPOT speedup vs `transformers` against context length, one line per method, the ideal dotted
    (where it is not simply 1)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, time, phase in zip(axes, ("ttft", "tpot"), ("prefill", "decode"), strict=True):
        for i, name in enumerate(_methods(rows)):
            mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["length"])
            lengths = [r["length"] for r in mine]
            color = f"C{i}"
            ax.plot(lengths, [r["speedup_vs_transformers"][time] for r in mine], "o-", color=color, label=name)
            ideal = [r["ideal_speedup"][phase] for r in mine]
            if all(v is not None for v in ideal) and any(abs(v - 1) > 1e-3 for v in ideal):  # 1.0 = the axis line
                ax.plot(lengths, ideal, ":", color=color, label=f"{name} ideal")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"{time.upper()} speedup vs transformers")
        ax.set_title(f"{phase}: {time.upper()}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(rows: Sequence[dict[str, Any]], accuracy: dict[str, float], path: Path) -> list[str]:
    """Accuracy against end-to-end speedup vs `transformers` at the longest length; returns the methods drawn."""
    longest = max(r["length"] for r in rows)
    points = [(r["method"], r["speedup_vs_transformers"]["e2e"]) for r in rows if r["length"] == longest]
    points = [(name, speed, accuracy[name]) for name, speed in points if name in accuracy]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, speed, acc in points:
        ax.scatter(speed, acc)
        ax.annotate(name, (speed, acc), textcoords="offset points", xytext=(4, 4), fontsize=9)
    ax.set_xlabel(f"end-to-end speedup vs transformers at {longest} tokens")
    ax.set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [name for name, _, _ in points]


def _methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [name for name in dict.fromkeys(r["method"] for r in rows) if name != TRANSFORMERS]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _median(s: Series, time: str) -> float:
    return statistics.median(getattr(x, time) for x in s.samples)


def _spread(s: Series, time: str) -> dict[str, float]:
    values = [getattr(x, time) for x in s.samples]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _render(rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    cells = (
        (str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )
    return "\n".join("  ".join(row) for row in cells)


def _ms(spread: dict[str, float]) -> str:
    scale = 1e3
    return f"{spread['median'] * scale:.1f} [{spread['min'] * scale:.1f}-{spread['max'] * scale:.1f}]"


def _x(value: float | None) -> str:
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
