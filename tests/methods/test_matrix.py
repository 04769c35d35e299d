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


TURN_2 = random_prompt(60, seed=12)[1:]
# Settings under which each method really prunes or drops at PROMPT's length (the defaults are for long prompts).
PRUNING = {
    "dense": "dense",
    "sliminfer": "sliminfer(budgets=(0.5, 0.25, 0.125))",
    "lazyllm": "lazyllm",
    "omnikv": "omnikv(budget=32)",
    "snapkv": "snapkv(budget=64)",
    "h2o": "h2o(budget=64)",
    "streaming_llm": "streaming_llm(window=60)",
}


def test_pruning_settings_cover_every_method_and_really_prune(deep_engine):
    assert set(PRUNING) == set(METHODS)
    dense = deep_engine.generate(PROMPT, max_new_tokens=2, method="dense").stats
    for name, spec in PRUNING.items():
        stats = deep_engine.generate(PROMPT, max_new_tokens=2, method=spec).stats
        pruned = stats.prefill_fraction < 1 or min(stats.decode_keys_per_layer) < min(dense.decode_keys_per_layer)
        assert pruned == (name != "dense"), name


def two_turns(engine, method, **start):
    session = engine.start(PROMPT, method=method, **start)
    first = session.generate(max_new_tokens=4)
    session.extend(TURN_2)
    return session, first, session.generate(max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_extend_under_keep_all_equals_one_shot(deep_engine, name):
    """Invariant 8: a session extended by a turn equals one prefill of the whole conversation (keep-all)."""
    session, first, second = two_turns(deep_engine, METHODS[name].keep_all())
    history = PROMPT + first.token_ids + TURN_2
    assert second.token_ids == deep_engine.generate(history, max_new_tokens=NEW_TOKENS, method="dense").token_ids
    assert second.stats.prompt_tokens == len(TURN_2) + 1 and second.stats.reused_tokens == len(PROMPT) + 3


@pytest.mark.parametrize("name", sorted(METHODS))
def test_extend_runs_while_pruning_and_reports_what_the_turn_could_not_see(deep_engine, name):
    _, _, second = two_turns(deep_engine, PRUNING[name])
    unseen = second.stats.unseen_tokens_per_layer
    assert len(unseen) == deep_engine.model.spec.num_layers and all(0 <= n <= len(PROMPT) + 4 for n in unseen)
    assert len(second.token_ids) == NEW_TOKENS


@pytest.mark.parametrize("spec", ["snapkv(budget=64)", "h2o(budget=64)", "streaming_llm(window=60)"])
def test_droppers_report_the_earlier_tokens_a_later_turn_lost(deep_engine, spec):
    _, _, second = two_turns(deep_engine, spec)
    assert min(second.stats.unseen_tokens_per_layer) > 0


@pytest.mark.parametrize("spec", ["omnikv(budget=32)", "omnikv(budget=32, offload=False)"])
def test_omnikv_later_turn_sees_every_earlier_token(deep_engine, spec):
    _, _, second = two_turns(deep_engine, spec)
    assert second.stats.unseen_tokens_per_layer == [0] * deep_engine.model.spec.num_layers


def test_omnikv_extend_with_offload_equals_without(deep_engine):
    offloaded = two_turns(deep_engine, "omnikv(budget=32)")[2]
    on_device = two_turns(deep_engine, "omnikv(budget=32, offload=False)")[2]
    assert offloaded.token_ids == on_device.token_ids


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("settings", ["pruning", "keep_all"])
def test_chunked_prefill_takes_the_same_decisions(deep_engine, name, settings):
    """Decisions are taken after a layer has seen every row, so chunking changes no token and no count."""
    method = resolve_method(PRUNING[name]) if settings == "pruning" else METHODS[name].keep_all()
    whole = deep_engine.start(PROMPT, method=method).generate(max_new_tokens=NEW_TOKENS)
    chunked = deep_engine.start(PROMPT, method=method, prefill_chunk=48).generate(max_new_tokens=NEW_TOKENS)
    assert chunked.token_ids == whole.token_ids
    assert chunked.stats.prefill_tokens_per_layer == whole.stats.prefill_tokens_per_layer
