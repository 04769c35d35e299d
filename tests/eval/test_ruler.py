"""RULER jsonl as a task source: loaded by (task, length), scored by the fraction of outputs found, clear errors."""

from __future__ import annotations

import json

import pytest

from tokensieve.cli import main
from tokensieve.eval.ruler import RULER_MAX_NEW_TOKENS, load_ruler

CONTEXT = "Filler text that goes on. " * 30


def write_ruler(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def ruler_records(n: int = 3) -> list[dict]:
    records = [
        {"index": i, "input": CONTEXT + f"The magic number is {1000 + i}. What is it?", "outputs": [str(1000 + i)]}
        for i in range(n)
    ]
    return [{**r, "length": 4096 if r["index"] % 2 else 8192} for r in records]


def test_ruler_file_loads_by_length_and_scores_the_fraction_found(tmp_path):
    path = write_ruler(tmp_path / "niah_single_1.jsonl", ruler_records())
    suite = load_ruler(path)
    assert set(suite) == {("ruler:niah_single_1", 4096), ("ruler:niah_single_1", 8192)}
    sample = suite["ruler:niah_single_1", 8192][0]
    assert sample.prompt() == ruler_records()[0]["input"] and sample.max_new_tokens == RULER_MAX_NEW_TOKENS
    assert sample.score(0, "It is 1000.") == 1.0 and sample.score(0, "It is 1001.") == 0.0
    two = load_ruler(write_ruler(tmp_path / "mv.jsonl", [{"input": "x", "outputs": ["Ab", "cd"], "length": 9}]))
    assert two["ruler:mv", 9][0].score(0, "xxABxx") == 0.5  # RULER: substrings, any case


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"input": "x", "outputs": ["1"]}', "needs the fields input, outputs, length; missing length"),
        ('{"input": "x", "outputs": [], "length": 5}', "'outputs' must be a non-empty list of strings"),
        ('{"input": "x", "outputs": ["1"], "length": "5"}', "'length' must be a positive int"),
        ("not json", "line 1: not JSON"),
    ],
)
def test_bad_ruler_records_are_clear_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_ruler(path)


def test_eval_cli_runs_a_ruler_file(tmp_path, capsys):
    path = write_ruler(tmp_path / "niah.jsonl", ruler_records(4))
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny", "--ruler", path, "--samples", "1", "--max-new-tokens", "2"]
    assert main([*argv, "--methods", "dense", "--out", str(out)]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert {(r["task"], r["length"]) for r in data["records"]} == {("ruler:niah", 4096), ("ruler:niah", 8192)}
    assert data["config"]["ruler"] == path
    assert main([*argv, "--tasks", "niah_single", "--out", str(out)]) == 2
    assert "--ruler is a task source of its own" in capsys.readouterr().err
