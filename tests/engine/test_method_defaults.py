"""Per-model method defaults: what a bare method name stands for with one model (a measured schedule)."""

from __future__ import annotations

import json

import pytest

import tokensieve
from conftest import random_prompt
from tokensieve import presets
from tokensieve.cli import main as cli_main
from tokensieve.loading import EMBEDDED_METHOD_DEFAULTS, read_method_defaults
from tokensieve.methods import Compose, LazyLLM, OmniKV, SlimInfer, check_method_defaults, resolve_method, spec_of

PROMPT = random_prompt(300, seed=5)
OWN = {
    "sliminfer": "sliminfer(prune_layers=(8,), budgets=(0.25,), block_size=16, unit_size=4)",
    "lazyllm": "lazyllm(prune_layers=(7,), budgets=(0.4,))",
}


@pytest.fixture(scope="module")
def measured(deep_engine) -> tokensieve.Engine:
    """The deep test model, with defaults of its own for SlimInfer and LazyLLM."""
    return tokensieve.Engine(deep_engine.model, deep_engine.tokenizer, method_defaults=OWN)


def test_a_bare_name_stands_for_the_models_settings(measured, deep_engine):
    assert measured.resolve("sliminfer") == SlimInfer(prune_layers=(8,), budgets=(0.25,), block_size=16, unit_size=4)
    gen = measured.generate(PROMPT, max_new_tokens=4, method="lazyllm")
    assert gen.stats.method["prune_layers"] == (7,) and gen.stats.method["budgets"] == (0.4,)
    explicit = deep_engine.generate(PROMPT, max_new_tokens=4, method=OWN["lazyllm"])
    assert gen.token_ids == explicit.token_ids
    assert gen.stats.prefill_tokens_per_layer == explicit.stats.prefill_tokens_per_layer
    assert (
        gen.stats.prefill_tokens_per_layer
        != deep_engine.generate(PROMPT, max_new_tokens=1, method="lazyllm").stats.prefill_tokens_per_layer
    )


def test_settings_given_start_from_the_papers_defaults_and_other_names_are_untouched(measured):
    assert measured.resolve("sliminfer(gamma=0.5)") == SlimInfer(gamma=0.5)
    assert measured.resolve("omnikv") == tokensieve.METHODS["omnikv"]()
    composed = measured.resolve("sliminfer+lazyllm")
    assert isinstance(composed, Compose)
    assert composed.prefill.prune_layers == (8,) and composed.decode.prune_layers == (7,)
    assert tokensieve.Engine(measured.model, measured.tokenizer, "lazyllm", method_defaults=OWN).method == LazyLLM(
        prune_layers=(7,), budgets=(0.4,)
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"slimfer": "sliminfer"}, "'slimfer': not a method name"),
        ({"sliminfer": "lazyllm"}, "is a lazyllm setting"),
        ({"sliminfer": "sliminfer+omnikv"}, "is a compose setting"),
        ({"lazyllm": "lazyllm(budgets=(0,))"}, "method default for 'lazyllm': .*must be > 0"),
        ({"lazyllm": "lazyllm(nope=1)"}, "bad settings for lazyllm"),
    ],
)
def test_bad_defaults_are_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        check_method_defaults(settings)


def test_embedded_smollm2_defaults_are_valid_for_its_30_layers():
    defaults = check_method_defaults(EMBEDDED_METHOD_DEFAULTS["smollm2"])
    assert set(defaults) == {"sliminfer", "lazyllm"}
    assert defaults["sliminfer"].schedule(30, 4096) == {26: 1024}
    assert defaults["lazyllm"].boundaries(30) == (20,)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint directory with a `tokensieve.json` of its own."""
    path = tmp_path_factory.mktemp("checkpoint")
    model, tokenizer = presets.build("tiny", seed=4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "tokensieve.json").write_text(
        json.dumps({"method_defaults": {"lazyllm": "lazyllm(budgets=(0.6, 0.4, 0.2))"}})
    )
    return path


def test_a_checkpoint_directory_brings_its_tokensieve_json(checkpoint, tmp_path, capsys):
    assert tokensieve.load(checkpoint).resolve("lazyllm").budgets == (0.6, 0.4, 0.2)
    assert tokensieve.load(checkpoint, method_defaults={}).resolve("lazyllm") == LazyLLM()
    pruning = tmp_path / "pruning.json"  # calibrate-pruning's output holds its recommendations so
    pruning.write_text(
        json.dumps(
            {"recommended": {"lazyllm": "x"}, "method_defaults": {"lazyllm": "lazyllm(budgets=(0.9, 0.8, 0.7))"}}
        )
    )
    engine = tokensieve.load(checkpoint, method_defaults=pruning)
    assert engine.resolve("lazyllm").budgets == (0.9, 0.8, 0.7) and engine.resolve("sliminfer") == SlimInfer()
    args = ["generate", "--model", str(checkpoint), "--prompt", "Hello there", "--max-new-tokens", "2"]
    assert cli_main([*args, "--method", "lazyllm", "--stats"]) == 0
    assert "budgets=(0.6, 0.4, 0.2)" in capsys.readouterr().out
    assert cli_main([*args, "--method", "lazyllm", "--stats", "--method-defaults", "none"]) == 0
    assert "budgets=(0.7, 0.5, 0.3)" in capsys.readouterr().out
    assert cli_main([*args, "--method", "lazyllm", "--stats", "--method-defaults", str(pruning)]) == 0
    assert "budgets=(0.9, 0.8, 0.7)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [("{", "not valid JSON"), ('{"method_defaults": ["lazyllm"]}', "expected"), ('{"other": 1}', "expected")],
)
def test_a_bad_method_defaults_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "defaults.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"method defaults {path}: {message}"):
        read_method_defaults(path)
    with pytest.raises(ValueError, match="cannot read it"):
        read_method_defaults(tmp_path / "missing.json")


def test_spec_of_reads_back_as_the_same_method():
    for method in (SlimInfer(), SlimInfer(prune_layers=(8,), budgets=(0.25,)), LazyLLM(revive_per_step=None),
                   OmniKV(budget=0.125, selector="exp"), Compose(SlimInfer(gamma=0.5), OmniKV(budget=64))):  # fmt: skip
        assert resolve_method(spec_of(method)) == method
    assert spec_of(LazyLLM()) == "lazyllm" and spec_of(OmniKV(budget=64)) == "omnikv(budget=64)"
