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
