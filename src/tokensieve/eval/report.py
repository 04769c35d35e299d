"""The results of an evaluation: a record per sample and method, the table's rows, and what is written.

`Report.rows` summarises the records per task, method and length (accuracy, paired TTFT speedups vs dense,
the computed fraction, greedy agreement, KL), with a `mean` row per method and length; `Report.save` writes
`eval.json` (config, environment, rows, every record), `eval.csv` and, if asked, `eval.png`.
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MEAN = "mean"  # the task name of the rows that average every task


@dataclass
class Record:
    """One sample run by one method at one length (a multi-turn sample counts its turns together)."""

    task: str
    method: str
    length: int
    sample: int
    score: float
    ttft_s: float  # mean over turns
    prompt_tokens: float  # mean over turns
    prefill_fraction: float  # token-layer computations in prefill vs dense, mean over turns
    agreement: float  # greedy agreement with dense's tokens on the same sample
    outputs: list[str]
    expected: list[list[str]]
    kl: float | None = None  # mean KL(dense || method), teacher-forced along dense's first answer (if asked)
    reused_turns: int = 0  # later turns that continued the session (`extend`) rather than recomputing


@dataclass
class Row:
    """A cell of the results table: one task, method and length, over its samples."""

    task: str
    method: str
    length: int
    samples: int
    accuracy: float
    ttft_s: float
    speedup: float  # median over samples of dense TTFT / method TTFT
    prefill_fraction: float
    prompt_tokens: float
    agreement: float
    kl: float | None  # None unless asked for (`kl=True`)


@dataclass
class Report:
    """Every record of an evaluation; `rows` summarises them per task, method and length (plus means)."""

    config: dict[str, Any]
    records: list[Record] = field(default_factory=list)

    @property
    def rows(self) -> list[Row]:
        groups: dict[tuple, list[Record]] = {}
        for r in self.records:
            groups.setdefault((r.task, r.method, r.length), []).append(r)
        rows = [_row(key, group, groups[(key[0], "dense", key[2])]) for key, group in groups.items()]
        return rows + _mean_rows(rows)

    def table(self) -> str:
        rows = self.rows
        # The name columns are as wide as their longest entry, so specs with settings keep the table aligned.
        tw = max([22, *(len(r.task) + 2 for r in rows)])
        mw = max([16, *(len(r.method) + 2 for r in rows)])
        header = f"{'task':<{tw}}{'method':<{mw}}{'length':>7}{'acc':>7}{'TTFT ms':>10}{'speedup':>9}"
        header += f"{'computed':>10}{'agree':>7}{'KL':>9}"
        lines = [header]
        for r in rows:
            kl = "-" if r.kl is None else f"{r.kl:.4f}"
            lines.append(
                f"{r.task:<{tw}}{r.method:<{mw}}{r.length:>7}{r.accuracy:>7.1%}{r.ttft_s * 1e3:>10.1f}"
                f"{r.speedup:>8.2f}x{r.prefill_fraction:>10.1%}{r.agreement:>7.0%}{kl:>9}"
            )
        return "\n".join(lines)

    def save(self, out: str | Path, plot: bool = False) -> list[Path]:
        """Write `eval.json` (config, rows, every record) and `eval.csv` (rows), and `eval.png` if asked."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) for r in self.rows]
        data = {"config": self.config, "environment": _environment(), "rows": rows}
        data["records"] = [asdict(r) for r in self.records]
        paths = [out / "eval.json", out / "eval.csv"]
        paths[0].write_text(json.dumps(data, indent=2, ensure_ascii=False))
        with paths[1].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(Row)])
            writer.writeheader()
            writer.writerows(rows)
        if plot:
            paths.append(self.plot(out / "eval.png"))
        return paths

    def plot(self, path: str | Path) -> Path:
        """Accuracy (mean over tasks) against TTFT speedup, one line per method through its lengths."""
        try:
            import matplotlib
        except ImportError as err:
            raise ValueError("plotting needs matplotlib: pip install 'tokensieve[plot]'") from err

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        means = [r for r in self.rows if r.task == MEAN]
        for method in dict.fromkeys(r.method for r in means):
            points = sorted((r for r in means if r.method == method), key=lambda r: r.length)
            ax.plot([p.speedup for p in points], [p.accuracy for p in points], marker="o", label=method)
            for p in points:
                ax.annotate(_length_label(p.length), (p.speedup, p.accuracy), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        ax.set_xlabel("TTFT speedup vs dense (x)")
        ax.set_ylabel("accuracy (mean over tasks)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def _row(key: tuple, group: list[Record], dense: list[Record]) -> Row:
    speedups = [d.ttft_s / r.ttft_s for d, r in zip(dense, group, strict=True)]
    accuracy = statistics.fmean(r.score for r in group)
    return _summary(*key, len(group), accuracy, group, statistics.median(speedups))


def _mean_rows(rows: list[Row]) -> list[Row]:
    """Per method and length, the unweighted mean over tasks (the speedup: the median of the tasks')."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.method, r.length), []).append(r)
    return [
        _summary(
            MEAN,
            method,
            length,
            sum(r.samples for r in group),
            statistics.fmean(r.accuracy for r in group),
            group,
            statistics.median(r.speedup for r in group),
        )
        for (method, length), group in groups.items()
    ]


def _summary(task: str, method: str, length: int, samples: int, accuracy: float, items: list, speedup: float) -> Row:
    """A row whose timing, computed-fraction, prompt-size and agreement columns are means over `items`."""

    def mean(name: str) -> float | None:
        values = [getattr(item, name) for item in items]
        return None if None in values else statistics.fmean(values)

    return Row(
        task, method, length, samples, accuracy, mean("ttft_s"), speedup, mean("prefill_fraction"),
        mean("prompt_tokens"), mean("agreement"), mean("kl"),
    )  # fmt: skip


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _environment() -> dict[str, str]:
    import torch

    import tokensieve

    info = {
        "tokensieve": tokensieve.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info
