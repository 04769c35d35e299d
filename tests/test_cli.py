"""The command line: every check that needs no model happens before the model loads; the options are complete."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import tokensieve
from conftest import random_prompt
from tokensieve import presets
from tokensieve.cli import build_parser, main

SRC = Path(tokensieve.__file__).parent


@pytest.fixture
def no_loading(monkeypatch):
    """Model loading fails the test: the command had to refuse its arguments first."""

    def loader(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(tokensieve, "load", loader)
    monkeypatch.setattr(presets, "build", loader)


def cli_error(argv: list[str], capsys) -> str:
    """Runs the CLI, expecting exit status 2 (argparse's or ours); returns stderr."""
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    assert status == 2
    return capsys.readouterr().err


GENERATE = ["generate", "--model", "tiny"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be an int >= 1, got '0'"),
        (["--prompt", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--prompt", "hi", "--temperature", "nan"], "--temperature must be finite"),
        (["--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
        (["--prompt", "hi", "--method", "dense("], "bad method spec 'dense('"),
        (["--prompt", "hi", "--method", "omnikv(budget=0)"], "budget must be > 0"),
        (["--prompt", "hi", "--dtype", "float8"], "unknown dtype 'float8'"),
        (["--prompt", "hi", "--device", "gpu0"], "unknown device 'gpu0'"),
        (["--prompt", "hi", "--stop", "x", "--stop", ""], "--stop holds an empty string"),
        (["--prompt-ids", "[1, true]"], "--prompt-ids token id at index 1 is True, a bool"),
        (["--prompt-ids", "[1, 2.5]"], "--prompt-ids token id at index 1 is 2.5"),
        (["--prompt-ids", "[1, -4]"], "--prompt-ids token id -4 at index 1 is out of range"),
        (["--prompt-ids", "[]"], "the --prompt-ids is empty"),
        (["--prompt-ids", "[1, 2"], "--prompt-ids is not a JSON list of token ids"),
        (["--prompt-ids", "ids.json"], "--prompt-ids ids.json: no such file"),
        (["--prompt-ids", "[1, 2]", "--chat"], "chat=True applies the chat template to text"),
        (["--prompt-ids", json.dumps([7] * 131000), "--max-new-tokens", "100"], "exceed the 131072 positions"),
        (["--prompt", "hi", "--prompt-ids", "[1]"], "not allowed with argument"),
        (["--prompt", "hi", "--encoding", "latin-1"], "--encoding is the encoding of --prompt-file"),
        (["--prompt", "hi", "--temperature", "1", "--seed", "-1"], "--seed must be in [0, 2**64)"),
    ],
)
def test_generate_refuses_bad_arguments_before_loading(no_loading, capsys, argv, message):
    assert message in cli_error(GENERATE + argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_refused_before_loading(no_loading, capsys):
    commands = (GENERATE + ["--prompt", "hi"], ["demo"], ["eval"], ["bench"], ["calibrate-filters", "--model", "x"])
    for command in commands:
        assert "CUDA is not available" in cli_error([*command, "--device", "cuda"], capsys)


def test_prompt_file_errors_name_the_file_and_the_option(no_loading, capsys, tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café au lait".encode("latin-1"))
    err = cli_error(GENERATE + ["--prompt-file", str(tmp_path)], capsys)
    assert f"--prompt-file {tmp_path} is a directory" in err
    err = cli_error(GENERATE + ["--prompt-file", str(latin)], capsys)
    assert f"--prompt-file {latin} is not utf-8 text (byte 3 is 0xe9)" in err and "--encoding" in err
    err = cli_error(GENERATE + ["--prompt-file", str(tmp_path / "nope.txt")], capsys)
    assert f"--prompt-file {tmp_path / 'nope.txt'}: no such file" in err
    err = cli_error(GENERATE + ["--prompt-file", str(latin), "--encoding", "klingon"], capsys)
    assert "--encoding 'klingon' is not a known text encoding" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--model", "tiny", "--tokens", "200000"], "--tokens: 200000 tokens plus 1 new exceed the 131072"),
        (["demo", "--tokens", "0"], "--tokens: must be an int >= 1"),
        (["demo", "--task", "nope"], "unknown task 'nope'"),
        (["demo", "--dtype", "float8"], "unknown dtype 'float8'"),
        (["eval", "--model", "tiny", "--lengths", "200k"], "--lengths: 204800 tokens plus 1 new exceed the 131072"),
        (["eval", "--tasks", "niah_single,nope"], "unknown task 'nope'"),
        (["eval", "--tasks", "niah_single:colours"], "takes values of kind"),
        (["eval", "--depth", "1.5"], "--depth must be in [0, 1]"),
        (["eval", "--samples", "0"], "--samples: must be an int >= 1"),
        (["eval", "--max-new-tokens", "0"], "--max-new-tokens: must be an int >= 1"),
        (["eval", "--methods", "dense,omnikv("], "bad method spec 'omnikv('"),
        (["eval", "--tasks", "narrativeqa"], "is a LongBench task, and no --longbench data holds it"),
        (["bench", "--model", "tiny", "--lengths", "200k"], "--lengths: 204800 tokens plus 32 new exceed"),
        (["bench", "--new-tokens", "1"], "--new-tokens must be >= 2"),
        (["bench", "--repeats", "0"], "--repeats: must be an int >= 1"),
        (["bench", "--methods", "dense("], "bad method spec 'dense('"),
        (["calibrate-filters", "--model", "tiny", "--prompts", "missing.jsonl"], "--prompts missing.jsonl: no such"),
        (["calibrate-filters", "--model", "tiny", "--num-prompts", "0"], "--num-prompts: must be an int >= 1"),
        (["calibrate-filters", "--model", "tiny", "--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["calibrate-pruning", "--model", "tiny", "--methods", "sliminfer,nope"], "--methods nope: unknown method"),
        (["calibrate-pruning", "--model", "tiny", "--methods", "omnikv"], "omnikv does not prune the prompt"),
        (["calibrate-pruning", "--model", "tiny", "--methods", "snapkv"], "snapkv does not prune the prompt"),
        (["calibrate-pruning", "--model", "tiny", "--haystack", "missing.json"], "file missing.json not found"),
        (["calibrate-pruning", "--model", "tiny", "--tokens", "200k"], "--tokens: must be an int >= 1"),
        (["calibrate-pruning", "--model", "tiny", "--tokens", "200000"], "--tokens: 200000 tokens plus 1 new exceed"),
        (["calibrate-pruning", "--model", "tiny", "--tokens", "10"], "--tokens must be at least 64"),
        (["calibrate-pruning", "--model", "tiny", "--num-prompts", "0"], "--num-prompts: must be an int >= 1"),
        (["calibrate-pruning", "--model", "tiny", "--candidate", "omnikv"], "give a sliminfer or lazyllm spec"),
        (["calibrate-pruning", "--model", "tiny", "--candidate", "lazyllm(budget=1)"], "bad settings for lazyllm"),
        (
            ["calibrate-pruning", "--model", "tiny", "--methods", "sliminfer", "--candidate", "lazyllm"],
            "candidate 'lazyllm' is a lazyllm setting, and --methods is sliminfer",
        ),
        (["calibrate-pruning", "--model", "tiny", "--grid", "missing.json"], "--grid missing.json: no such file"),
    ],
)
def test_every_command_refuses_bad_arguments_before_loading(no_loading, capsys, argv, message):
    assert message in cli_error(argv, capsys)


def test_demo_tokens_beyond_the_testbed_are_refused_before_loading(no_loading, capsys):
    from tokensieve.testbed import MODEL_DIR

    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip("the testbed model is not embedded")
    limit = json.loads((MODEL_DIR / "config.json").read_text())["max_position_embeddings"]
    argv = ["demo", "--model", "testbed", "--tokens", "100000"]
    assert f"exceed the {limit} positions of testbed" in cli_error(argv, capsys)


@pytest.fixture(scope="module")
def tiny_engine() -> tokensieve.Engine:
    model, tok = presets.build("tiny")  # what `--model tiny` loads
    return tokensieve.load(model, tokenizer=tok)


def test_stop_is_repeatable_and_the_earliest_stop_wins(tiny_engine, capsys):
    prompt = "Once upon a time"
    text = tiny_engine.generate(prompt, max_new_tokens=40).text
    starts = [i for i in range(3, len(text) - 2) if text[i : i + 2].isascii() and text[i : i + 2].isprintable()]
    late, early = text[starts[-1] : starts[-1] + 2], text[starts[0] : starts[0] + 2]
    expected = tiny_engine.generate(prompt, max_new_tokens=40, stop=[late, early])
    assert expected.finish_reason == "stop" and len(expected.text) <= starts[0]
    argv = GENERATE + ["--prompt", prompt, "--max-new-tokens", "40", "--stop", late, "--stop", early]
    assert main(argv) == 0
    assert capsys.readouterr().out == expected.text + "\n"


def test_prompt_ids_as_json_or_a_file_equal_the_api(tiny_engine, capsys, tmp_path):
    ids = random_prompt(30, seed=4)
    expected = tiny_engine.generate(ids, max_new_tokens=6).text
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    for source in (json.dumps(ids), str(tmp_path / "ids.json")):
        assert main(GENERATE + ["--prompt-ids", source, "--max-new-tokens", "6"]) == 0
        assert capsys.readouterr().out == expected + "\n"


def test_prompt_file_in_another_encoding(tiny_engine, capsys, tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    expected = tiny_engine.generate("café au lait", max_new_tokens=6).text
    assert main(GENERATE + ["--prompt-file", str(path), "--encoding", "latin-1", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == {"generate", "demo", "bench", "eval", "calibrate-filters", "calibrate-pruning", "serve"}
    for name, command in commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings} has no help text"
            if action.default not in (None, argparse.SUPPRESS) and action.nargs != 0:
                assert "default" in formatter._expand_help(action), f"{name} {action.option_strings}: no default"
    generate_help = commands["generate"].format_help()
    assert "(default: 64)" in generate_help and "(default: random)" in generate_help
    assert "(default: 1.0)" in generate_help  # --top-p
    eval_seed = next(a for a in commands["eval"]._actions if a.dest == "seed")
    assert commands["eval"]._get_formatter()._expand_help(eval_seed).endswith("(default: 0)")


def test_top_level_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "computes only the tokens that matter" in out and "examples:" in out
    for command in ("generate", "demo", "bench", "eval", "calibrate-filters", "calibrate-pruning"):
        assert command in out


def test_no_module_imports_the_cli_entry_point():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for pattern in ("from .cli ", "from ..cli ", "tokensieve.cli", "from . import cli"):
            assert pattern not in text, f"{path.relative_to(SRC)} imports the CLI entry point"
