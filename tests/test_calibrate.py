"""Filter-layer calibration: the capture measure, the peak picking, the recorder and the command."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import STORIES, needs_stories, random_prompt
from tokensieve.calibrate import RecordAttention, capture_curve, capture_matrix, recommend_filters
from tokensieve.cli import main


def test_capture_matrix_measures_later_layers_mass_on_each_layers_top_k():
    attention = torch.tensor(
        [[[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.05, 0.35, 0.05, 0.05]]]  # last row: mass 0.5 on prompt
    )
    matrix = capture_matrix(attention, top_k=1)
    expected = torch.tensor([[0.7, 0.1, 0.1], [0.1, 0.7, 0.1], [0.1, 0.1, 0.7]])
    torch.testing.assert_close(matrix, expected)
    curve = capture_curve(matrix)
    assert curve[0] == pytest.approx(0.1) and curve[1] == pytest.approx(0.1) and curve[2] is None


def test_recommendation_takes_highest_peaks_then_best_remaining_layers():
    curve = [0.1, 0.5, 0.3, 0.6, 0.2, 0.4, None]
    assert recommend_filters(curve, 2) == [1, 3]
    assert recommend_filters(curve, 3) == [1, 3, 5]
    assert recommend_filters(curve, 4) == [1, 2, 3, 5]


def test_recorder_decodes_densely_and_records_prompt_attention(deep_engine):
    prompt = random_prompt(120, seed=3)
    dense = deep_engine.generate(prompt, max_new_tokens=5)
    gen = deep_engine.generate(prompt, max_new_tokens=5, method=RecordAttention())
    assert gen.token_ids == dense.token_ids
    attention = gen.stats.method_stats["attention"]
    assert attention.shape == (4, deep_engine.model.spec.num_layers, len(prompt))
    total = attention.sum(-1)  # the rest of the mass is on generated tokens
    assert bool(((total > 0.5) & (total <= 1 + 1e-5)).all()) and bool((attention >= 0).all())


@needs_stories()
def test_command_on_stories_writes_curve_plot_and_recommendation(tmp_path, capsys):
    out = tmp_path / "calib"
    argv = ["calibrate-filters", "--model", str(STORIES), "--tokens", "200", "--steps", "3", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "filters.json").read_text())
    assert result["layers"] == 5 and result["prompts"] == 3 and result["prompt_tokens"] == [200] * 3
    curve = result["capture_curve"]
    assert len(curve) == 5 and curve[-1] is None and all(0 <= v <= 1 for v in curve[:-1])
    assert len(result["capture_matrix"]) == 5 and len(result["recommended_filter_layers"]) == 3
    assert all(0 <= c < 4 for c in result["recommended_filter_layers"])
    assert (out / "filters.png").stat().st_size > 1000
    assert "recommended filter layers" in capsys.readouterr().out


def test_command_reads_jsonl_prompts_on_a_preset(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("a long story " * 20) + "\n" + json.dumps({"prompt": "another text " * 20}) + "\n")
    out = tmp_path / "calib"
    argv = ["calibrate-filters", "--model", "tiny", "--prompts", str(prompts), "--tokens", "100", "--steps", "2"]
    assert main([*argv, "--top-k", "8", "--out", str(out)]) == 0
    result = json.loads((out / "filters.json").read_text())
    assert result["prompt_tokens"] == [100, 100] and result["top_k"] == 8 and result["layers"] == 4


def test_bad_top_k_is_a_clear_error(tmp_path, capsys):
    argv = ["calibrate-filters", "--model", "tiny", "--tokens", "50", "--top-k", "lots", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--top-k must be a token count" in capsys.readouterr().err
