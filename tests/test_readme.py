"""The README's runnable Python examples run (those that need no checkpoint path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "path/to" not in b]


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, capsys, request):
    if "smollm2" in code:  # converted once per test session, in a temporary cache
        request.getfixturevalue("smollm2_cache")
    exec(compile(code, str(README), "exec"), {})
    assert capsys.readouterr().out  # every example prints what it shows


def test_readme_has_runnable_examples():
    assert len(BLOCKS) >= 2
