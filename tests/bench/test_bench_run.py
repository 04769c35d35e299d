"""`tokensieve bench` end to end on the tiny preset: it runs, and writes complete JSON and plots."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from tokensieve import cli
from tokensieve.bench import load_accuracy
from tokensieve.bench.command import parse_lengths
from tokensieve.methods import METHODS, split_methods

RECORD_KEYS = {
    "method",
    "length",
    "repeats",
    "new_tokens",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "speedup_vs_transformers",
    "speedup_vs_dense",
    "ideal_speedup",
    "of_ideal",
    "memory",
    "stats",
}
MACHINE_KEYS = {"date", "platform", "cpu", "python", "torch", "transformers", "tokensieve", "threads"}
MACHINE_KEYS |= {"device", "gpu", "dtype"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    accuracy = out / "eval.json"
    accuracy.write_text(json.dumps([{"method": "dense", "accuracy": 0.5}, {"method": "dense", "accuracy": 1.0}]))
    argv = ["bench", "--model", "tiny", "--device", "cpu", "--methods", "dense,Dense", "--lengths", "64,96"]
    argv += ["--new-tokens", "2", "--repeats", "1", "--out", str(out), "--accuracy", str(accuracy), "--no-progress"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    return out, printed.getvalue()


def test_bench_writes_json_with_every_field(bench_run):
    document = json.loads((bench_run[0] / "bench.json").read_text())
    assert document["machine"].keys() >= MACHINE_KEYS
    assert document["machine"]["dtype"] == "float32" and document["machine"]["device"] == "cpu"
    assert document["config"]["lengths"] == [64, 96] and document["model"]["num_layers"] == 4
    rows = document["results"]
    expected = {(name, n) for name in ("transformers", "dense") for n in (64, 96)}
    assert {(r["method"], r["length"]) for r in rows} == expected
    for r in rows:
        assert r.keys() == RECORD_KEYS
        assert r["repeats"] == 1 and r["new_tokens"] == 2
        for time in ("ttft_s", "tpot_s", "e2e_s"):
            assert 0 < r[time]["min"] <= r[time]["median"] <= r[time]["max"]
        assert set(r["speedup_vs_transformers"]) == set(r["speedup_vs_dense"]) == {"ttft", "tpot", "e2e"}
        assert r["memory"]["peak_rss_bytes"] > 0 and r["memory"]["peak_device_bytes"] is None
        if r["method"] == "transformers":
            assert r["speedup_vs_transformers"]["ttft"] == 1.0 and r["stats"] is None
        else:
            assert r["stats"]["prompt_tokens"] == r["length"] and r["memory"]["kv_bytes_device"] > 0
        if r["method"] in ("transformers", "dense"):
            assert r["ideal_speedup"] == {"prefill": 1.0, "decode": pytest.approx(1.0), "e2e": pytest.approx(1.0)}
        if r["method"] == "dense":
            assert r["speedup_vs_dense"]["ttft"] == 1.0
            dense_ttft = r["ttft_s"]["median"]
            hf = next(x for x in rows if x["method"] == "transformers" and x["length"] == r["length"])
            assert r["speedup_vs_transformers"]["ttft"] == pytest.approx(hf["ttft_s"]["median"] / dense_ttft)


def test_bench_prints_tables_and_draws_plots(bench_run):
    out, printed = bench_run
    assert "TTFT ms [min-max]" in printed and "TPOT ms [min-max]" in printed and "peak RSS MiB" in printed
    assert sum(line.startswith(("transformers ", "dense ")) for line in printed.splitlines()) == 8
    for name in ("speedup.png", "accuracy_vs_speedup.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_means_every_registered_method():
    assert split_methods("all") == split_methods(" ALL ") == sorted(METHODS)
    assert split_methods("dense, omnikv(budget=256, filter_layers=(1, 2))") == [
        "dense",
        "omnikv(budget=256, filter_layers=(1, 2))",
    ]


def test_unknown_method_is_a_clear_error(capsys):
    assert cli.main(["bench", "--model", "tiny", "--methods", "dense,nope", "--lengths", "64"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_bad_settings_are_clear_errors():
    from tokensieve import load, presets
    from tokensieve.bench import measure

    model, tokenizer = presets.build("tiny", max_positions=256)
    engine = load(model, tokenizer=tokenizer, device="cpu")
    with pytest.raises(ValueError, match="exceed the model's 256 positions"):
        measure(engine, ["dense"], [250], new_tokens=8, progress=False)
    with pytest.raises(ValueError, match="too short"):
        measure(engine, ["dense"], [8], new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        measure(engine, ["dense"], [64], new_tokens=1, progress=False)


def test_contestants_accept_specs_and_always_include_the_baselines():
    from tokensieve.bench.runner import contestants

    assert contestants(["Dense", "omnikv(budget=256)"]) == ["transformers", "dense", "omnikv(budget=256)"]
    with pytest.raises(ValueError, match="bad settings for omnikv"):
        contestants(["omnikv(nope=1)"])


def test_lengths_and_accuracy_files(tmp_path):
    assert parse_lengths("8k, 4k,4096,100") == [100, 4096, 8192]
    with pytest.raises(ValueError, match="bad context length 'abc'"):
        parse_lengths("abc")
    plain = tmp_path / "plain.json"
    plain.write_text('{"dense": 0.75, "sliminfer": 0.5}')
    assert load_accuracy(plain) == {"dense": 0.75, "sliminfer": 0.5}
    nested = tmp_path / "nested.json"
    nested.write_text('{"results": [{"method": "a", "accuracy": 0.2}, {"method": "a", "accuracy": 0.4}]}')
    assert load_accuracy(nested) == {"a": pytest.approx(0.3)}
    bad = tmp_path / "bad.json"
    bad.write_text('[{"name": "a"}]')
    with pytest.raises(ValueError, match="expected"):
        load_accuracy(bad)
