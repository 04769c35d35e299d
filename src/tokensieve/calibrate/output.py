"""What both calibration commands write: the result as JSON beside its plot, drawn without a display."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (files only: a command may run on a machine without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(result: dict[str, Any], out: str | Path, stem: str, plot: Callable[[dict, Path], None]) -> tuple[Path, Path]:
    """`out/stem.json` (the result) and `out/stem.png` (drawn by `plot(result, path)`); the two paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data, figure = out / f"{stem}.json", out / f"{stem}.png"
    data.write_text(json.dumps(result, indent=1))
    plot(result, figure)
    return data, figure
