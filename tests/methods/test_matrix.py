"""The same checks for every registered method (kvpress-style matrix)."""

from __future__ import annotations

import pytest

from conftest import random_prompt
from tokensieve.methods import METHODS, resolve_method

PROMPT = random_prompt(320, seed=11)
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def dense_tokens(deep_engine):
    return deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method="dense").token_ids


@pytest.mark.parametrize("name", sorted(METHODS))
def test_keep_all_settings_reproduce_dense(deep_engine, dense_tokens, name):
    """Invariant 2: a budget that covers everything changes nothing."""
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=METHODS[name].keep_all())
    assert gen.token_ids == dense_tokens
    assert gen.stats.prefill_tokens_per_layer == [len(PROMPT)] * deep_engine.model.spec.num_layers


@pytest.mark.parametrize("name", sorted(METHODS))
def test_default_settings_report_complete_stats(deep_engine, name):
    """Invariant 5: every generation reports what it did, with one entry per layer."""
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=name)
    stats, layers = gen.stats, deep_engine.model.spec.num_layers
    assert stats.method["name"] == name
    assert stats.prompt_tokens == len(PROMPT) and stats.new_tokens == len(gen.token_ids) >= 1
    assert len(stats.prefill_tokens_per_layer) == layers and len(stats.decode_keys_per_layer) == layers
    assert all(0 < n <= len(PROMPT) for n in stats.prefill_tokens_per_layer)
    assert all(0 < k <= len(PROMPT) + NEW_TOKENS for k in stats.decode_keys_per_layer)
    assert stats.kv_bytes_device > 0 and stats.kv_bytes_host >= 0 and stats.ttft_s > 0


def test_unknown_method_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        resolve_method("nope")


def test_method_specs_carry_settings_and_split_on_top_level_commas():
    from tokensieve.methods import OmniKV, SlimInfer, split_methods

    method = resolve_method("sliminfer(budgets=(0.25, 0.125, 0.0625), gamma=0.8)")
    assert method == SlimInfer(budgets=(0.25, 0.125, 0.0625), gamma=0.8)
    assert resolve_method(" OmniKV(budget=128) ") == OmniKV(budget=128)
    assert split_methods("dense, sliminfer(budgets=(0.5,0.25,0.1)),omnikv(budget=64)") == [
        "dense",
        "sliminfer(budgets=(0.5,0.25,0.1))",
        "omnikv(budget=64)",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sliminfer(3)", "keyword arguments"),
        ("sliminfer(budgets=__import__('os'))", "Python literals"),
        ("sliminfer(nope=1)", "bad settings for sliminfer"),
        ("omnikv(budget=0)", "budget must be > 0"),
    ],
)
def test_bad_method_specs_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_method(spec)
