"""The same checks for every registered method (kvpress-style matrix)."""

from __future__ import annotations

import pytest
import torch

from conftest import PRUNING, random_prompt
from device_syncs import decode_syncs_per_step
from tokensieve.cache import Kind
from tokensieve.methods import METHODS, Compose, LazyLLM, OmniKV, SlimInfer, resolve_method, split_methods

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


# -- composition: a prefill method with a decode method ----------------------------------------------------
PREFILL_SIDE = ["dense", "sliminfer", "lazyllm", "snapkv"]
DECODE_SIDE = ["dense", "omnikv", "streaming_llm", "h2o", "sliminfer", "lazyllm"]
PAIRS = [(p, d) for p in PREFILL_SIDE for d in DECODE_SIDE if not (p == "snapkv" and METHODS[d].needs_shared_kv)]


@pytest.mark.parametrize(("first", "then"), PAIRS)
def test_composition_under_keep_all_equals_dense(deep_engine, dense_tokens, first, then):
    method = Compose(METHODS[first].keep_all(), METHODS[then].keep_all())
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=method)
    assert gen.token_ids == dense_tokens
    assert gen.stats.method["name"] == f"{first}+{then}"
    assert set(gen.stats.method_stats) == {"prefill", "decode"}


@pytest.mark.parametrize("then", DECODE_SIDE)
def test_dense_prefill_then_a_decode_method_decodes_exactly_as_that_method(deep_engine, then):
    """`dense+X` is X's decode side alone (SlimInfer's and LazyLLM's: `prune_prefill=False`; the others: X itself)."""
    alone = deep_engine.generate(
        PROMPT, max_new_tokens=NEW_TOKENS, method=resolve_method(PRUNING[then]).as_decode_side()
    )
    composed = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=f"dense+{PRUNING[then]}")
    assert composed.token_ids == alone.token_ids
    assert composed.stats.decode_keys_per_layer == alone.stats.decode_keys_per_layer
    assert composed.stats.method_stats["decode"] == alone.stats.method_stats


@pytest.mark.parametrize("first", PREFILL_SIDE)
def test_a_prefill_method_then_dense_prefills_exactly_as_that_method(deep_engine, first):
    alone = deep_engine.generate(PROMPT, max_new_tokens=1, method=PRUNING[first])
    composed = deep_engine.generate(PROMPT, max_new_tokens=1, method=f"{PRUNING[first]}+dense")
    assert composed.token_ids == alone.token_ids
    assert composed.stats.prefill_tokens_per_layer == alone.stats.prefill_tokens_per_layer


@pytest.mark.parametrize(("first", "then"), PAIRS)
def test_composition_prunes_on_both_sides_and_runs_sessions(deep_engine, first, then):
    """Each side's decisions show beside the other's, and a composed session takes a later turn."""
    spec = f"{PRUNING[first]}+{PRUNING[then]}"
    composed = deep_engine.generate(PROMPT, max_new_tokens=4, method=spec).stats
    prefill_only = deep_engine.generate(PROMPT, max_new_tokens=4, method=f"{PRUNING[first]}+dense").stats
    assert composed.prefill_tokens_per_layer == prefill_only.prefill_tokens_per_layer
    if first in ("sliminfer", "lazyllm"):
        assert composed.prefill_fraction < 1
    if (first, then) == ("lazyllm", "lazyllm"):  # its budgets among what its own budgets kept: all of it
        assert composed.decode_keys_per_layer == prefill_only.decode_keys_per_layer
    elif then != "dense":  # the decode side attends to fewer keys than dense decode over the same prefill
        assert sum(composed.decode_keys_per_layer) < sum(prefill_only.decode_keys_per_layer)
    _, _, second = two_turns(deep_engine, spec)
    assert len(second.token_ids) == NEW_TOKENS
    assert len(second.stats.unseen_tokens_per_layer) == deep_engine.model.spec.num_layers


def test_omnikv_after_sliminfer_selects_by_position_among_what_each_layer_holds(deep_engine):
    """Past a pruning layer a layer holds only the kept blocks: OmniKV selects and gathers there by position."""
    for offload in (True, False):
        spec = f"sliminfer(budgets=(0.5, 0.25, 0.125))+omnikv(budget=1.0, offload={offload})"
        composed = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=spec)
        pruned = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=spec.split("+")[0] + "+dense")
        assert composed.token_ids == pruned.token_ids  # budget 1.0 selects everything each layer holds
        assert composed.stats.decode_keys_per_layer == pruned.stats.decode_keys_per_layer


def _record_contexts(policy) -> list[tuple[int, list[int], list[int]]]:
    """Wrap `policy.decode_context`: per call, the layer, the positions attended and the positions it holds."""
    seen, decode_context = [], policy.decode_context

    def recording(step):
        context = decode_context(step)
        shown = context.pos if context.hidden is None else context.pos[~context.hidden]
        seen.append((step.layer, shown.tolist(), step.kv.positions.tolist()))
        return context

    policy.decode_context = recording
    return seen


def test_lazyllm_after_sliminfer_selects_by_position_among_what_each_layer_holds(deep_engine):
    """Past SlimInfer's pruning layers the layers of one LazyLLM stage hold different prompt entries: each
    layer attends to the selected tokens it holds, found by position in its own KV."""
    session = deep_engine.start(PROMPT, method=f"{PRUNING['sliminfer']}+lazyllm")
    policy = session.policy.then
    seen = _record_contexts(policy)
    session.generate(max_new_tokens=NEW_TOKENS)
    assert any(len(policy.layouts_of_stage[stage]) > 1 for stage in range(1, 4))  # the case that matters
    narrowed = 0
    for layer, shown, held in seen:
        assert set(shown) <= set(held) and len(set(shown)) == len(shown)
        stage = policy.stage_of[layer]
        prompt = [p for p in shown if p < len(PROMPT)]
        if stage:
            assert len(prompt) <= policy.keep[stage - 1]
        assert all(p in shown for p in held if p >= len(PROMPT))  # generated tokens: always attended
        narrowed += len(shown) < len(held)
    assert narrowed > 0


def test_lazyllm_after_sliminfer_with_a_budget_covering_everything_is_sliminfer_then_dense(deep_engine):
    pruned = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=f"{PRUNING['sliminfer']}+dense")
    method = Compose(resolve_method(PRUNING["sliminfer"]), LazyLLM(budgets=(1.0, 1.0, 1.0)))
    composed = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=method)
    assert composed.token_ids == pruned.token_ids
    assert composed.stats.decode_keys_per_layer == pruned.stats.decode_keys_per_layer


def test_lazyllm_as_decode_side_reports_its_selections_and_keeps_no_aux_cache(deep_engine):
    layers = deep_engine.model.spec.num_layers
    for first in ("dense", "sliminfer"):
        stats = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=f"{PRUNING[first]}+lazyllm").stats
        decode = stats.method_stats["decode"]
        budgets = [round(f * len(PROMPT)) for f in LazyLLM().budgets]
        assert decode["decode_selection"] == "dynamic" and decode["budget_tokens"] == budgets
        assert stats.method["decode"]["prune_prefill"] is False and stats.method["decode"]["revive_per_step"] == 0
        assert "aux_cache_bytes" not in decode and stats.revived_tokens == 0
        assert stats.decode_rows_per_layer == [1.0] * layers
        selected = decode["selected_per_boundary"]
        if first == "dense":  # every layer holds the whole prompt: each boundary selects its budget
            assert selected == budgets and decode["revivals_deferred_per_step"] == 0
        else:  # SlimInfer left fewer tokens than LazyLLM's later budgets in the deep layers
            assert all(0 < n <= b for n, b in zip(selected, budgets, strict=True)) and selected != budgets


@pytest.mark.parametrize("first", ["dense", "sliminfer"])
def test_lazyllm_as_decode_side_extends_like_one_shot_under_keep_all(deep_engine, first):
    method = Compose(METHODS[first].keep_all(), LazyLLM.keep_all())
    _, first_turn, second = two_turns(deep_engine, method)
    history = PROMPT + first_turn.token_ids + TURN_2
    assert second.token_ids == deep_engine.generate(history, max_new_tokens=NEW_TOKENS, method="dense").token_ids


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("omnikv+dense", "put it on the decode side"),
        ("dense+lazyllm(revive=False)", "decodes over every key prefill left"),
        ("dense+snapkv", "put it on the prefill side"),
        ("snapkv+omnikv", "each KV head its own tokens"),
        ("snapkv+h2o", "each KV head its own tokens"),
        ("snapkv+sliminfer", "each KV head its own tokens"),
        ("snapkv+lazyllm", "each KV head its own tokens"),
        ("dense+omnikv+h2o", "one prefill method \\+ one decode method"),
        ("sliminfer+omnikv(budget=0)", "budget must be > 0"),
    ],
)
def test_compositions_that_cannot_mean_anything_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_method(spec)


def test_composition_specs_carry_both_sides_settings():
    method = resolve_method("sliminfer(budgets=(0.25, 0.125, 0.0625))+omnikv(budget=0.067)")
    assert method == Compose(SlimInfer(budgets=(0.25, 0.125, 0.0625)), OmniKV(budget=0.067))
    assert method.settings()["name"] == "sliminfer+omnikv"
    assert method.settings()["decode"]["budget"] == 0.067
    assert split_methods("dense,sliminfer+omnikv(budget=8)") == ["dense", "sliminfer+omnikv(budget=8)"]


# -- the same checks for every method and every composition pair -------------------------------------------
EVERY = [PRUNING[name] for name in sorted(METHODS)] + [f"{PRUNING[p]}+{PRUNING[d]}" for p, d in PAIRS]


@pytest.mark.parametrize("spec", [s for s in EVERY if "sliminfer" in s or "omnikv" in s])
def test_offload_equals_no_offload_bitwise(deep_engine, spec):
    """Invariant 6: where KV lives changes nothing (logits bitwise equal on CPU)."""
    off = spec.replace("sliminfer(", "sliminfer(offload=False, ").replace("omnikv(", "omnikv(offload=False, ")
    dense_tokens = deep_engine.generate(PROMPT, max_new_tokens=6, method="dense").token_ids
    ours = deep_engine.next_token_logits(PROMPT, dense_tokens, method=spec)
    theirs = deep_engine.next_token_logits(PROMPT, dense_tokens, method=off)
    assert torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def bf16_engine(deep_engine):
    import copy

    import tokensieve

    engine = tokensieve.load(copy.deepcopy(deep_engine.model.hf), tokenizer=deep_engine.tokenizer, dtype="bfloat16")
    assert engine.model.dtype == torch.bfloat16 and deep_engine.model.dtype == torch.float32
    return engine


@pytest.mark.parametrize("spec", EVERY)
def test_bf16_runs_and_stays_close_to_fp32(bf16_engine, deep_engine, spec):
    fp32 = deep_engine.next_token_logits(PROMPT, [], method=spec)[0]
    bf16 = bf16_engine.next_token_logits(PROMPT, [], method=spec)[0]
    assert torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() <= 0.15 * fp32.abs().max()
    assert bf16_engine.model.dtype == torch.bfloat16


@pytest.mark.parametrize("spec", EVERY)
def test_positions_are_original_and_never_renumbered(deep_engine, spec):
    """Invariant 3: every entry of every layer's KV carries the original position of a token of the session."""
    session, _, _ = two_turns(deep_engine, spec)
    for kv in session.kv:
        positions = kv.positions.tolist()
        assert all(0 <= p < len(session.tokens) for p in positions)
        if resolve_method(spec).kv_layout == "shared" and "+snapkv" not in spec and not spec.startswith("snapkv"):
            assert len(set(positions)) == len(positions)


def expected_kinds(positions: torch.Tensor, first_call: int) -> torch.Tensor:
    """The kind of each position of `two_turns`' conversation: the prompt, the first call's decoded tokens
    (its last token is computed by the turn), the turn, then the second call's decoded tokens."""
    decoded, turn_end = len(PROMPT) + first_call - 1, len(PROMPT) + first_call + len(TURN_2)
    kinds = torch.full_like(positions, Kind.GENERATED)
    kinds[positions < turn_end] = Kind.TURN
    kinds[positions < decoded] = Kind.GENERATED
    kinds[positions < len(PROMPT)] = Kind.PROMPT
    return kinds


@pytest.mark.parametrize("spec", EVERY)
def test_each_entry_records_what_computed_it_and_where_it_lives(deep_engine, spec):
    """Issue 11: each layer's KV records per entry which pass computed it, through every method's evictions,
    swaps and offloads, and the positions it holds on the host, apart from those on the device; where a
    method offloads, device and host together hold exactly what the same method holds on the device alone."""
    session, first, second = two_turns(deep_engine, spec)
    revived = 0
    for kv in session.kv:
        kinds, positions = kv.kinds.long(), kv.positions
        again = kinds == Kind.REVIVED  # prompt tokens LazyLLM computed in a decode step, after the prompt pass's
        assert (positions[again] < len(PROMPT)).all() and not again[: kv.leading(Kind.PROMPT)].any()
        revived += int(again.sum())
        assert torch.equal(kinds[~again], expected_kinds(positions, len(first.token_ids))[~again])
        assert [kind for kind, _ in kv.runs()] == torch.unique_consecutive(kinds).tolist()
        assert [n for _, n in kv.runs()] == torch.unique_consecutive(kinds, return_counts=True)[1].tolist()
        host = kv.host_positions
        assert torch.equal(host, host.unique()) and not torch.isin(host, positions).any()
    assert revived == first.stats.revived_tokens + second.stats.revived_tokens
    if any(name in spec.split("+")[-1] for name in ("sliminfer", "omnikv")):  # methods that offload in decode
        off = spec.replace("sliminfer(", "sliminfer(offload=False, ").replace("omnikv(", "omnikv(offload=False, ")
        alone, _, _ = two_turns(deep_engine, off)
        assert sum(kv.host_count for kv in session.kv) > 0 == sum(kv.host_count for kv in alone.kv)
        for kv, on_device in zip(session.kv, alone.kv, strict=True):
            held = torch.cat([kv.positions, kv.host_positions]).sort().values
            assert torch.equal(held, on_device.positions.sort().values)


BUDGETS = {
    "sliminfer": "budgets=(0, 0.5, 0.25)",
    "lazyllm": "budgets=(0.5, 0.25, -1)",
    "omnikv": "budget=0",
    "snapkv": "budget=0",
    "h2o": "budget=-5",
    "streaming_llm": "window=0",
}


@pytest.mark.parametrize("name", sorted(BUDGETS))
@pytest.mark.parametrize("where", ["alone", "composed"])
def test_a_budget_of_zero_or_less_is_an_error(name, where):
    spec = f"{name}({BUDGETS[name]})"
    if where == "composed":
        spec = f"{spec}+dense" if name in PREFILL_SIDE else f"dense+{spec}"
    with pytest.raises(ValueError, match="must be > 0"):
        resolve_method(spec)


# -- no host-device sync per layer in a decode step (issue 11, Must hold) ------------------------------------
SYNC_SPECS = EVERY + ["omnikv(budget=32, offload=False)", f"{PRUNING['sliminfer']}+omnikv(budget=32, offload=False)"]


@pytest.mark.parametrize("spec", SYNC_SPECS)
def test_a_decode_step_syncs_with_the_device_at_a_few_layers_not_at_every_layer(deep_engine, monkeypatch, spec):
    """What may make the host wait in a decode step: the new token's id (once per step), and a method's few
    special layers (LazyLLM's boundaries: three of the twelve here), each a few times at most; SlimInfer's
    pruning layers read nothing back (`test_sliminfer`). Counted on CPU by the calls that would wait on CUDA
    (see `device_syncs`)."""
    per_step = decode_syncs_per_step(deep_engine, PROMPT, spec, 6, monkeypatch)
    assert per_step.get("step", 0) <= 1, per_step
    assert len([where for where in per_step if where != "step"]) <= 3, per_step
    assert all(n <= 3 for n in per_step.values()), per_step
