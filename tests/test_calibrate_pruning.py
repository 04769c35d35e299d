"""Pruning-schedule calibration: the default grid, keep-all equals dense, the recommendation rule, the command."""

from __future__ import annotations

import json

import pytest

import tokensieve
from tokensieve.calibrate.grid import LAZYLLM_GRID, check_candidate, default_grid
from tokensieve.calibrate.pruning import Measured, calibrate_pruning, needle_prompts, recommend
from tokensieve.cli import main
from tokensieve.eval.tasks import Sample
from tokensieve.methods import LazyLLM, SlimInfer, resolve_method

KEEP_ALL = {"sliminfer(budgets=(1.0, 1.0, 1.0))": "sliminfer", "lazyllm(budgets=(1.0, 1.0, 1.0))": "lazyllm"}
PRUNED = {"sliminfer(budgets=(0.25, 0.125, 0.0625))": "sliminfer", "lazyllm(budgets=(0.3, 0.1, 0.05))": "lazyllm"}
FIELDS = {"method", "spec", "accuracy", "agreement", "computed", "ttft_s", "ttft_vs_dense", "scores", "outputs"}


def measured(method: str, computed: float, accuracy: float, agreement: float) -> Measured:
    spec = f"{method}({computed}, {accuracy}, {agreement})"  # unique, readable in a failure
    return Measured(method, spec, accuracy, agreement, computed, 1.0, 1.0, [accuracy], [""], [100])


def test_default_grid_is_small_placed_by_depth_and_runs_on_the_model():
    for method, cls in (("sliminfer", SlimInfer), ("lazyllm", LazyLLM)):
        deep = default_grid(method, 30)
        assert 6 <= len(deep) <= 8 and len(set(deep)) == len(deep) and deep[0] == method  # the defaults first
        assert all(isinstance(resolve_method(spec), cls) for spec in deep)
        assert all(check_candidate(spec, [method], 30, 2048) == method for spec in deep)
        shallow = default_grid(method, 4)  # layers that collapse at this depth are left out, the rest run
        assert 1 <= len(shallow) <= len(deep) and all(check_candidate(s, [method], 4, 300) == method for s in shallow)
    assert "lazyllm(prune_layers=(2, 3), budgets=(0.5, 0.3))" not in default_grid("lazyllm", 4)  # (2, 2): left out
    assert len(default_grid("lazyllm", 4)) == len(LAZYLLM_GRID) - 1
    assert "sliminfer(prune_layers=(15, 22), budgets=(0.25, 0.125), query_window=32)" in default_grid("sliminfer", 30)
    assert "lazyllm(prune_layers=(20,), budgets=(0.3,))" in default_grid("lazyllm", 30)


def test_recommendation_is_the_cheapest_candidate_as_accurate_as_dense():
    results = [
        measured("sliminfer", 0.30, 0.5, 0.9),  # cheapest, but below dense
        measured("sliminfer", 0.5004, 1.0, 0.8),
        measured("sliminfer", 0.5001, 1.0, 0.9),  # ties with the one above (0.1%), higher agreement
        measured("sliminfer", 0.70, 1.0, 1.0),
        measured("lazyllm", 0.10, 1.0, 1.0),  # another method's: not a sliminfer recommendation
    ]
    pick, reason = recommend(1.0, results, "sliminfer")
    assert pick is results[2] and reason.startswith(f"sliminfer: {results[2].spec} computes 50.0% of the prompt")
    assert recommend(0.5, results, "sliminfer")[0] is results[0]  # at least dense's accuracy
    assert recommend(1.0, results, "lazyllm")[0] is results[4]
    pick, reason = recommend(1.0, results[:1], "sliminfer")
    assert pick is None and "no candidate matches dense's accuracy (100%)" in reason and results[0].spec in reason
    pick, reason = recommend(0.0, results, "sliminfer")
    assert pick is None and "dense finds no needle on these prompts" in reason


@pytest.fixture(scope="module")
def samples(deep_engine) -> list[Sample]:
    return needle_prompts(deep_engine.tokenizer, 300, 2)


def test_keep_all_candidates_equal_dense_and_pruned_ones_compute_less(deep_engine, samples, monkeypatch):
    # A scorer that depends on the answer (random weights find no needle): equal answers, equal scores.
    monkeypatch.setattr(Sample, "score", lambda self, turn, output: float(len(output) % 2))
    result = calibrate_pruning(deep_engine, samples, {**KEEP_ALL, **PRUNED}, progress=False)
    json.dumps(result)  # pruning.json holds it
    assert result["layers"] == 12 and result["prompts"] == 2 and result["task"] == "niah_single:numbers"
    assert all(abs(tokens - 300) <= 6 for tokens in result["prompt_tokens"])
    dense, candidates = result["dense"], {c["spec"]: c for c in result["candidates"]}
    assert set(dense) >= FIELDS and list(candidates) == [*KEEP_ALL, *PRUNED]
    assert set(result["recommended"]) == set(result["reasons"]) == {"sliminfer", "lazyllm"}
    for spec in KEEP_ALL:
        kept = candidates[spec]
        assert kept["agreement"] == 1.0 and kept["computed"] == 1.0 and kept["outputs"] == dense["outputs"]
        assert kept["scores"] == dense["scores"] and kept["accuracy"] == dense["accuracy"]
    for spec in PRUNED:
        assert candidates[spec]["computed"] < 0.7 and candidates[spec]["ttft_vs_dense"] > 0


def test_recommendation_from_measured_runs_follows_an_oracle_scorer(deep_engine, samples, monkeypatch):
    dense_answers = {s.context: deep_engine.generate(s.prompt(), max_new_tokens=s.max_new_tokens).text for s in samples}
    monkeypatch.setattr(Sample, "score", lambda self, turn, output: 1.0)  # everything is right: the cheapest wins
    result = calibrate_pruning(deep_engine, samples, {**KEEP_ALL, **PRUNED}, progress=False)
    assert result["recommended"] == {"sliminfer": list(PRUNED)[0], "lazyllm": list(PRUNED)[1]}
    assert result["method_defaults"] == result["recommended"]  # explicit specs already
    # A bare name that stands for a model's own settings is recommended by what it ran as.
    measured = tokensieve.Engine(deep_engine.model, deep_engine.tokenizer, method_defaults={"lazyllm": list(PRUNED)[1]})
    result = calibrate_pruning(measured, samples[:1], {"lazyllm": "lazyllm"}, progress=False)
    assert result["recommended"] == {"lazyllm": "lazyllm"} and result["method_defaults"] == {"lazyllm": list(PRUNED)[1]}
    # Right only where the answer is dense's: the pruned settings (which change the answer) no longer hold.
    monkeypatch.setattr(Sample, "score", lambda self, turn, output: float(output == dense_answers[self.context]))
    result = calibrate_pruning(deep_engine, samples, {**KEEP_ALL, **PRUNED}, progress=False)
    assert result["dense"]["accuracy"] == 1.0
    assert all(c["agreement"] < 1 for c in result["candidates"] if c["spec"] in PRUNED)  # the test's premise
    assert result["recommended"] == {"sliminfer": list(KEEP_ALL)[0], "lazyllm": list(KEEP_ALL)[1]}


def test_command_writes_json_png_and_table_and_reads_its_own_json_as_a_grid(tmp_path, capsys):
    out = tmp_path / "calib"
    argv = ["calibrate-pruning", "--model", "tiny", "--threads", "1", "--tokens", "300", "--num-prompts", "2"]
    candidates = ["--candidate", list(KEEP_ALL)[0], "--candidate", "lazyllm(budgets=(0.5, 0.3, 0.15))"]
    assert main([*argv, *candidates, "--out", str(out)]) == 0
    result = json.loads((out / "pruning.json").read_text())
    assert (out / "pruning.png").stat().st_size > 1000
    assert result["model"] == "tiny" and result["tokens"] == 300 and result["haystack"] == "procedural"
    assert {"date", "wall_s", "threads", "dense", "candidates", "recommended", "reasons"} <= set(result)
    assert [c["spec"] for c in result["candidates"]] == candidates[1::2]
    printed = capsys.readouterr().out
    assert "computed" in printed and "recommended (*):" in printed and "pruning.png" in printed
    again = tmp_path / "again"
    assert main([*argv, "--methods", "lazyllm", "--grid", str(out / "pruning.json"), "--out", str(again)]) == 2
    assert "is a sliminfer setting, and --methods is lazyllm" in capsys.readouterr().err
    assert main([*argv, "--grid", str(out / "pruning.json"), "--out", str(again)]) == 0
    assert [c["spec"] for c in json.loads((again / "pruning.json").read_text())["candidates"]] == candidates[1::2]


def test_command_runs_the_default_grid_of_each_method(tmp_path):
    argv = ["calibrate-pruning", "--model", "tiny", "--tokens", "300", "--num-prompts", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    specs = [c["spec"] for c in json.loads((tmp_path / "pruning.json").read_text())["candidates"]]
    assert specs == default_grid("sliminfer", 4) + default_grid("lazyllm", 4)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--candidate", "lazyllm(prune_layers=(1, 9), budgets=(0.5, 0.3))"], "must lie in [0, 2] for a 4-layer"),
        (["--candidate", "sliminfer(prune_layers=(1, 9), budgets=(0.5, 0.3))"], "reach beyond this model's 4 layers"),
        (["--chat"], "--chat (chat=True) needs a chat template"),
    ],
)
def test_settings_the_model_cannot_run_are_clear_errors(tmp_path, capsys, options, message):
    assert main(["calibrate-pruning", "--model", "tiny", "--tokens", "300", *options, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_tokens_beyond_a_model_known_only_once_loaded(tmp_path, capsys, monkeypatch):
    from tokensieve.commands import options

    monkeypatch.setattr(options, "known_max_positions", lambda model: None)  # as for a model not yet converted
    assert main(["calibrate-pruning", "--model", "tiny", "--tokens", "140000", "--out", str(tmp_path)]) == 2
    assert "--tokens 140000 exceeds the 131072 positions of tiny" in capsys.readouterr().err


def test_bad_grid_files_are_clear_errors(tmp_path, capsys):
    for text, message in (("{nope", "not valid JSON"), ('{"candidates": []}', "expected a non-empty JSON list")):
        grid = tmp_path / "grid.json"
        grid.write_text(text)
        assert main(["calibrate-pruning", "--model", "tiny", "--grid", str(grid), "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
