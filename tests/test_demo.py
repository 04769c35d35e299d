"""`tokensieve demo` on the embedded testbed model: every method in the table, dense answers right."""

from __future__ import annotations

import pytest

from tokensieve.cli import main
from tokensieve.methods import METHODS
from tokensieve.testbed import MODEL_DIR


@pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason="the testbed model is not embedded")
def test_demo_prints_every_method_and_dense_is_right(capsys):
    assert main(["demo", "--tokens", "700", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in METHODS}
    assert set(rows) == set(METHODS)
    assert " yes " in rows["dense"] and "1.00x" in rows["dense"]
