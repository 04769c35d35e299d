"""docs/distributed.md's Python example runs as a script (its rank is spawned) and prints what the page shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTION = (REPO / "docs" / "distributed.md").read_text().split("## Tensor parallelism\n", 1)[1].split("\n## ", 1)[0]


def test_the_tensor_parallel_example_prints_what_the_page_shows(tmp_path):
    code, shown = re.search(r"```python\n(.*?)```\n\n```text\n(.*?)```", SECTION, re.S).groups()
    script = tmp_path / "example.py"  # a file, not exec: spawn re-imports the main module in the other rank
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == shown
