"""Plots of `tokensieve bench` records: speedup against context length, and accuracy against speedup."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import TRANSFORMERS


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


def plot_batch(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """`--mode batch`: decode tokens/s against batch size, one line per contestant and one panel per context
    length; a method's ideal (our dense times its byte-model ratio) dotted."""
    plt = _pyplot()
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        mine = [r for r in rows if r["length"] == length]
        for i, name in enumerate(dict.fromkeys(r["method"] for r in mine)):
            line = sorted((r for r in mine if r["method"] == name), key=lambda r: r["batch"])
            sizes = [r["batch"] for r in line]
            ax.plot(sizes, [r["tokens_per_s"] for r in line], "o-", color=f"C{i}", label=name)
            if all(r["ideal_vs_dense"] not in (None, 1.0) for r in line):
                ideal = [r["tokens_per_s"] / r["vs_dense"] * r["ideal_vs_dense"] for r in line]
                ax.plot(sizes, ideal, ":", color=f"C{i}", label=f"{name} ideal (bytes)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"context {length} tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [name for name in dict.fromkeys(r["method"] for r in rows) if name != TRANSFORMERS]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
