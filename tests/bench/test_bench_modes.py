"""Each `tokensieve bench --mode` end to end on the tiny preset, and bad settings rejected before loading."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from tokensieve import cli
from tokensieve.bench import command

TINY = ["--model", "tiny", "--device", "cpu", "--no-progress", "--repeats", "1"]


def bench(tmp_path, *argv: str) -> tuple[dict, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["bench", *TINY, "--out", str(tmp_path), *argv]) == 0
    mode = argv[argv.index("--mode") + 1]
    return json.loads((tmp_path / f"bench-{mode}.json").read_text()), printed.getvalue()


def test_ttft_mode_times_the_prefill_only(tmp_path):
    document, printed = bench(tmp_path, "--mode", "ttft", "--methods", "dense,lazyllm", "--lengths", "64")
    rows = {r["method"]: r for r in document["results"]}
    assert list(rows) == ["transformers", "dense", "lazyllm"] and document["config"]["mode"] == "ttft"
    for r in rows.values():
        assert r["new_tokens"] == 1 and r["ttft_s"]["median"] > 0
        assert r["speedup_vs_transformers"]["tpot"] is None and r["ideal_speedup"]["decode"] in (None, 1.0)
    assert rows["lazyllm"]["ideal_speedup"]["prefill"] > 1  # it skipped token-layers: the FLOP ideal says so
    assert "TTFT ms" in printed and "TPOT" not in printed


def test_a_budget_fraction_too_small_for_the_short_warm_up_is_warmed_up_on_the_measured_prompt(tmp_path):
    # 1/10 of the 256-token warm-up prompt is 25 keys, not more than SnapKV's 32-token window: an error there,
    # while 1/10 of the 400 tokens measured is 40 keys, a valid setting
    document, _ = bench(tmp_path, "--mode", "ttft", "--methods", "snapkv(budget=0.1)", "--lengths", "400")
    assert [r["method"] for r in document["results"]] == ["transformers", "dense", "snapkv(budget=0.1)"]


def test_decode_mode_times_steps_after_an_untimed_prefill(tmp_path):
    omnikv_spec = "omnikv(budget=16, filter_layers=(0,))"  # layers 2 and 3 of 4 attend 16 selected keys
    document, printed = bench(tmp_path, "--mode", "decode", "--methods", omnikv_spec, "--lengths", "96")
    rows = {r["method"]: r for r in document["results"]}
    assert list(rows) == ["transformers", "dense", omnikv_spec]
    for r in rows.values():
        assert r["steps"] == 16 and r["rounds"] == 1 and r["tpot_s"]["median"] > 0
    dense, omnikv = rows["dense"]["stats"], rows[omnikv_spec]["stats"]
    assert dense["new_tokens"] == 16 and dense["context_tokens"] == 97  # the prompt and the first token
    assert min(omnikv["decode_keys_per_layer"]) < min(dense["decode_keys_per_layer"])
    assert rows[omnikv_spec]["ideal_speedup"] > 1 and rows["dense"]["ideal_speedup"] == pytest.approx(1)
    assert "prefill untimed, 16 steps per round" in printed
    assert document["config"]["method_settings"][omnikv_spec]["budget"] == 16  # each spec as it ran


def test_multi_turn_mode_extends_and_recomputes_the_same_conversation(tmp_path):
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps({"text": "A long essay about startups and painting. " * 20}))
    argv = ["--mode", "multi-turn", "--methods", "omnikv", "--lengths", "128", "--turns", "3", "--new-tokens", "2"]
    document, printed = bench(tmp_path, *argv, "--document", str(doc))
    rows = document["results"]
    order = [(method, turn) for method in ("dense", "omnikv", "transformers") for turn in (1, 2, 3)]
    assert [(r["method"], r["turn"]) for r in rows] == order
    dense = [r for r in rows if r["method"] == "dense"]
    assert all(r["same_tokens"] for r in dense)  # dense: extend + generate == generate over the whole conversation
    assert dense[0]["computed_tokens"] == dense[0]["context_tokens"] > 128
    for earlier, later in zip(dense, dense[1:], strict=False):
        assert earlier["context_tokens"] < later["context_tokens"]
        assert later["computed_tokens"] < later["context_tokens"]
        assert later["ideal_prefill_speedup"] > 1
    assert all(r["extend_s"] is None and r["recompute_s"]["median"] > 0 for r in rows if r["method"] == "transformers")
    assert "extend ms" in printed


def test_memory_mode_measures_each_prefill_in_its_own_process(tmp_path):
    argv = ["--mode", "memory", "--methods", "dense", "--lengths", "256", "--prefill-chunk", "32"]
    document, printed = bench(tmp_path, *argv)
    rows = [(r["method"], r["prefill_chunk"]) for r in document["results"]]
    assert rows == [("transformers", None), ("dense", None), ("dense", 32)]
    for r in document["results"]:
        assert r["measure"] == "peak RSS" and r["peak_bytes"] >= r["before_prefill_bytes"] > 0
        assert r["length"] == 256 and (r["kv_bytes_reserved"] is None) == (r["method"] == "transformers")
    assert "vs unchunked" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "memory"], "give --prefill-chunk N"),
        (["--new-tokens", "1"], "--new-tokens must be >= 2 in --mode e2e"),
        (["--mode", "decode", "--new-tokens", "0"], "--new-tokens must be >= 1 in --mode decode"),
        (["--mode", "multi-turn", "--document", "/no/such/file"], "--document /no/such/file: no such file"),
        (["--mode", "ttft", "--methods", "nope"], "unknown method 'nope'"),
    ],
)
def test_bad_settings_fail_before_the_model_loads(monkeypatch, capsys, argv, message):
    def no_loading(args):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(command, "load_engine", no_loading)
    assert cli.main(["bench", "--model", "tiny", "--lengths", "64", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "fast"], "invalid choice: 'fast'"),
        (["--mode", "multi-turn", "--turns", "0"], "--turns: must be an int >= 1"),
        (["--repeats", "0"], "--repeats: must be an int >= 1"),
        (["--mode", "memory", "--prefill-chunk", "0"], "--prefill-chunk: must be an int >= 1"),
    ],
)
def test_bad_values_are_argument_errors(capsys, argv, message):
    with pytest.raises(SystemExit):
        cli.main(["bench", *argv])
    assert message in capsys.readouterr().err


def test_batch_mode_measures_decode_throughput_at_each_batch_size(tmp_path):
    spec = "omnikv(budget=16, filter_layers=(0,))"
    argv = ("--mode", "batch", "--methods", spec, "--lengths", "96", "--batch", "1,3", "--new-tokens", "6")
    document, printed = bench(tmp_path, *argv)
    rows = document["results"]
    assert {(r["batch"], r["method"]) for r in rows} == {
        (b, m) for b in (1, 3) for m in ("transformers", "dense", spec)
    }
    assert all(r["tokens_per_s"] > 0 and r["tpot_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in rows)
    assert all(r["vs_dense"] == pytest.approx(1) for r in rows if r["method"] == "dense")
    assert document["config"]["batch"] == [1, 3] and "decode tokens/s" in printed
    ideal = {(r["batch"], r["method"]): r["ideal_vs_dense"] for r in rows}
    assert ideal[(1, "dense")] == ideal[(3, "dense")] == 1.0 and ideal[(3, "transformers")] is None
    # OmniKV reads 16 of ~100 prompt keys at its sparse layers; a bigger batch shares the weights' bytes more
    assert 1 < ideal[(1, spec)] < ideal[(3, spec)]
    assert (tmp_path / "batch.png").stat().st_size > 0


@pytest.mark.parametrize("batch", ["0,4", "four", ""])
def test_bad_batch_sizes_fail_before_loading(tmp_path, batch, monkeypatch, capsys):
    monkeypatch.setattr(command, "load_engine", lambda args: pytest.fail("loaded the model"))
    assert cli.main(["bench", *TINY, "--mode", "batch", "--batch", batch, "--out", str(tmp_path)]) == 2
    assert "--batch" in capsys.readouterr().err


def test_batch_contestants_decode_the_same_tokens_on_their_joined_caches():
    """The transformers contestant prefills the prompts in groups and joins the caches; our dense path,
    prefilled by the scheduler, decodes the same greedy tokens."""
    import tokensieve
    from tokensieve.bench.batch import OurBatch, TheirBatch, batch_prompts

    engine = tokensieve.load("tiny", dtype="float32")
    prompts = batch_prompts(engine, 1500, 3)  # 2048 // 1500: one prompt per transformers pass, three caches joined
    ours, theirs = OurBatch.prefill(engine, "dense", prompts), TheirBatch.prefill(engine, prompts)
    assert ours.prefill_s > 0 and theirs.prefill_s > 0
    for batch in (ours, theirs):
        batch.decode(3)
        batch.decode(4)
    assert [session.tokens[1500:] for session in ours.sessions] == theirs.tokens()
    assert len(theirs.tokens()) == 3 and len(theirs.tokens()[0]) == 8
    # --shared-prompt: copies of the first sequence continue exactly as it does, each on its own state
    ours_copies, theirs_copies = ours.copies(2), theirs.copies(2)
    for batch in (ours, theirs, ours_copies, theirs_copies):
        batch.decode(3)
    assert [s.tokens[1500:] for s in ours_copies.sessions] == [ours.sessions[0].tokens[1500:]] * 2
    assert theirs_copies.tokens() == [theirs.tokens()[0][7:]] * 2  # from the token its copied logits chose
    assert ours_copies.prefill_s is None and theirs_copies.prefill_s is None


def test_batch_mode_with_a_shared_prompt(tmp_path):
    argv = ("--mode", "batch", "--methods", "dense", "--lengths", "64", "--batch", "2", "--new-tokens", "3")
    document, printed = bench(tmp_path, *argv, "--shared-prompt")
    assert document["config"]["shared_prompt"] is True
    assert {r["method"] for r in document["results"]} == {"transformers", "dense"}
    assert all(r["prefill_tokens_per_s"] is None and r["tokens_per_s"] > 0 for r in document["results"])
