"""`tokensieve serve` and `tokensieve bench` on a tensor-parallel engine (2 gloo ranks, the tiny preset)."""

from __future__ import annotations

import json

import pytest

import tokensieve
from tokensieve.cli import main
from tokensieve.serve.app import create_app
from tokensieve.serve.config import ServeConfig
from tokensieve.serve.server import running


def test_the_server_answers_from_two_ranks_as_from_one():
    from openai import OpenAI

    one = tokensieve.load("tiny")
    engine = tokensieve.load("tiny", tensor_parallel_size=2)
    with engine, running(create_app(engine, ServeConfig(model_name="tiny"))) as (_, url):
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        for method in ("dense", "omnikv(budget=16)"):
            reply = client.completions.create(model="tiny", prompt="two ranks, one answer", max_tokens=8,
                                              temperature=0, extra_body={"tokensieve": {"method": method}})  # fmt: skip
            expected = one.generate("two ranks, one answer", max_new_tokens=8, method=method)
            assert reply.choices[0].text == expected.text


def test_bench_compares_two_ranks_with_one_and_counts_the_all_reduces(tmp_path, capsys):
    length, new_tokens = 256, 4
    code = main(["bench", "--model", "tiny", "--tensor-parallel-size", "2", "--threads", "1", "--lengths",
                 str(length), "--methods", "omnikv(budget=32)", "--repeats", "1", "--new-tokens", str(new_tokens),
                 "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert code in (0, None)
    rows = json.loads((tmp_path / "bench-parallel.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["dense", "omnikv(budget=32)"]
    layers, hidden, fp32 = 4, 64, 4  # the tiny preset
    for row in rows:
        assert row["same_tokens"]
        # two all-reduces of [rows, hidden] per layer: every prompt row in prefill, one row per decode step
        assert row["prefill_model_bytes"] == 2 * layers * length * hidden * fp32
        assert row["step_model_bytes"] == 2 * layers * hidden * fp32
    dense, omnikv = rows
    assert dense["step_selection_bytes"] == 0 and dense["prefill_selection_bytes"] == 0
    filter_layers = 3  # OmniKV scales the paper's 3 filter layers to the model; each reduces one score per prompt token
    assert omnikv["step_selection_bytes"] == pytest.approx(filter_layers * length * fp32, rel=0.35)
    assert "TPOT 2 ranks" in capsys.readouterr().out


def test_bench_refuses_tensor_parallelism_outside_e2e(capsys):
    assert main(["bench", "--model", "tiny", "--tensor-parallel-size", "2", "--mode", "decode"]) == 2
    assert "--tensor-parallel-size compares N ranks with 1 in whole generations" in capsys.readouterr().err
