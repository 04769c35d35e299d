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


@pytest.mark.parametrize("threads", ["0", "-2", "two"])
def test_threads_must_be_a_positive_int_in_every_command(capsys, threads):
    for command in ("demo", "eval", "bench", "generate"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--model", "tiny", "--threads", threads])
        assert exit_info.value.code == 2
        assert "--threads: must be an int >= 1" in capsys.readouterr().err


def test_threads_sets_torch_threads(capsys):
    import torch

    before = torch.get_num_threads()  # 1: the suite pins it (conftest.py)
    try:
        assert main(["generate", "--model", "tiny", "--prompt", "abc", "--max-new-tokens", "2", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
