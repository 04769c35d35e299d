"""SlimInfer: block scoring, the pruning schedule, original positions, decode swaps, offload, memory model."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from conftest import DEEP, random_prompt
from device_syncs import decode_syncs_per_step
from tokensieve import cli, load, presets
from tokensieve.cache import Kind, LayerKV
from tokensieve.methods import METHODS, LayerStep, Rows, Run, SlimInfer, resolve_method
from tokensieve.methods.sliminfer import SlimInferPolicy
from tokensieve.methods.sliminfer_blocks import block_scores, top_blocks, unit_keys
from tokensieve.model import ModelSpec

PROMPT = random_prompt(1000, seed=5)  # 15 whole blocks and a last block of 40 tokens
FRACTIONS = (0.5, 0.25, 0.125)  # 1000 -> 488 -> 232 -> 104 tokens on the 12-layer model (layers 4, 8, 11)


class SpyPolicy(SlimInferPolicy):
    """Records what the policy decided and what the engine stored, for the tests to check."""

    def __init__(self, method, run):
        super().__init__(method, run)
        self.kept: dict[int, torch.Tensor] = {}
        self.stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rescorings: list[tuple[int, int, set[int], set[int]]] = []  # step, layer, active, top
        self.steps = 0

    def prefill_keep_after_attention(self, step):
        index = super().prefill_keep_after_attention(step)
        if index is not None:
            self.kept[step.layer] = index
        return index

    def prefill_layer_done(self, step):
        self.stored[step.layer] = (step.kv.keys.clone(), step.kv.positions.clone())
        super().prefill_layer_done(step)

    def rescore(self, store, query):
        layer = next(layer for layer, managed in self.layers.items() if managed is store)
        top = top_blocks(block_scores(query.float(), store.units), len(store.slots))
        self.rescorings.append((self.steps, layer, set(store.slots.tolist()), set(top.tolist())))
        super().rescore(store, query)

    def decode_step_done(self):
        self.steps += 1


@dataclass
class Spy(SlimInfer):
    def start(self, run):
        self.policy = SpyPolicy(self, run)
        return self.policy


@pytest.fixture(scope="module")
def dense_tokens(deep_engine):
    return deep_engine.generate(PROMPT, max_new_tokens=8, method="dense").token_ids


def spec(layers=12, heads=8, kv_heads=2, head_dim=16) -> ModelSpec:
    return ModelSpec(layers, heads * head_dim, heads, kv_heads, head_dim, 64, 258, 4096, "llama")


# -- settings and schedule -----------------------------------------------------------------------------
def test_registered_by_name():
    assert METHODS["sliminfer"] is SlimInfer
    assert resolve_method("sliminfer") == SlimInfer()


@pytest.mark.parametrize(
    "layers, expected", [(32, (10, 20, 30)), (28, (9, 18, 26)), (12, (4, 8, 11)), (2, (1,)), (1, (0,))]
)
def test_default_layers_scale_with_depth_and_merge_on_shallow_models(layers, expected):
    schedule = SlimInfer().schedule(layers, 32768)
    assert tuple(schedule) == expected
    assert schedule[expected[-1]] == 2048  # merged layers keep the smallest budget


def test_budgets_as_fractions_and_counts():
    assert SlimInfer(budgets=(0.25, 0.125, 0.0625)).schedule(32, 8192) == {10: 2048, 20: 1024, 30: 512}
    assert SlimInfer(prune_layers=(3, 7), budgets=(300, 0.1)).schedule(12, 1000) == {3: 300, 7: 100}


@pytest.mark.parametrize(
    "settings, error",
    [
        (dict(budgets=(0, 10, 10)), ValueError),
        (dict(budgets=(-5, 10, 10)), ValueError),
        (dict(budgets=(1.5, 0.5, 0.5)), ValueError),
        (dict(budgets=("many", 10, 10)), TypeError),
        (dict(budgets=(10, 10)), ValueError),
        (dict(budgets=()), ValueError),
        (dict(prune_layers=(3,), budgets=(10, 10)), ValueError),
        (dict(prune_layers=(5, 3), budgets=(10, 10)), ValueError),
        (dict(unit_size=7), ValueError),
        (dict(block_size=0), ValueError),
        (dict(query_window=0), ValueError),
        (dict(gamma=1.5), ValueError),
        (dict(prune_prefill=False, kv_manager=False), ValueError),  # nothing left to do
    ],
)
def test_bad_settings_are_clear_errors(settings, error):
    with pytest.raises(error):
        SlimInfer(**settings)


def test_prune_layer_beyond_the_model_is_an_error(deep_engine):
    with pytest.raises(ValueError, match="beyond this model's 12 layers"):
        deep_engine.generate(PROMPT[:50], max_new_tokens=1, method=SlimInfer(prune_layers=(20,), budgets=(10,)))


# -- scoring ---------------------------------------------------------------------------------------------
def reference_block_scores(q, k, block_size, unit_size, window):
    """The paper's scoring written out with loops: per unit, per query head, its own KV head."""
    heads, kv_heads = q.shape[0], k.shape[0]
    query = q[:, -window:].mean(1)
    scores = []
    for start in range(0, k.shape[1] - block_size + 1, block_size):
        units = []
        for unit in range(start, start + block_size, unit_size):
            per_head = [
                abs(float(query[h] @ k[h // (heads // kv_heads), unit : unit + unit_size].mean(0)))
                for h in range(heads)
            ]
            units.append(sum(per_head) / heads)
        scores.append(max(units))
    return torch.tensor(scores)


@pytest.mark.parametrize("heads, kv_heads, block_size, unit_size", [(8, 2, 64, 8), (4, 4, 16, 4), (6, 3, 32, 32)])
def test_scoring_and_selection_match_a_reference(heads, kv_heads, block_size, unit_size):
    torch.manual_seed(0)
    n, tail, budget = 11 * block_size + 5, 5, 5 * block_size  # 11 whole blocks; 3 + sink + last block fit
    q, k = torch.randn(heads, n, 16), torch.randn(kv_heads, n, 16)
    full = k[:, : n - tail].unflatten(1, (11, block_size))
    expected = reference_block_scores(q, k, block_size, unit_size, 4)
    scores = block_scores(q[:, -4:].mean(1), unit_keys(full, unit_size))
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)

    method = SlimInfer(prune_layers=(0,), budgets=(budget,), block_size=block_size, unit_size=unit_size)
    policy = method.start(Run(spec(1, heads, kv_heads), n, torch.device("cpu"), torch.float32, 0.25))
    rows = Rows(torch.zeros(n, 1), torch.arange(n))
    kv = LayerKV(kv_heads, 16, torch.float32, torch.device("cpu"))
    kv.append(k, torch.zeros_like(k), rows.pos, Kind.PROMPT)
    step = LayerStep(0, rows, q, k, kv)
    policy.prefill_observe(step)
    kept = policy.prefill_keep_after_attention(step)
    best = sorted([0, *(expected[1:].topk(3).indices + 1).tolist()])
    expected_rows = [b * block_size + i for b in best for i in range(block_size)] + list(range(n - tail, n))
    assert kept.tolist() == expected_rows


# -- prefill ---------------------------------------------------------------------------------------------
def test_keep_all_and_prompts_within_budget_equal_dense(deep_engine, dense_tokens):
    for method in (SlimInfer.keep_all(), SlimInfer()):  # the default budgets exceed this 1000-token prompt
        gen = deep_engine.generate(PROMPT, max_new_tokens=8, method=method)
        assert gen.token_ids == dense_tokens
        assert gen.stats.prefill_tokens_per_layer == [len(PROMPT)] * 12
        assert gen.stats.method_stats["pruned_tokens"] == [0, 0, 0]
        assert gen.stats.method_stats["decode_rescorings"] == 0 and gen.stats.kv_bytes_host == 0
        assert gen.stats.method_stats["mean_overlap"] is None


@pytest.mark.parametrize("layers", [1, 2])
def test_shallow_models_work(layers):
    model, tok = presets.build(dict(DEEP, num_hidden_layers=layers), seed=2)
    engine = load(model, tokenizer=tok)
    dense = engine.generate(PROMPT[:300], max_new_tokens=4, method="dense").token_ids
    assert engine.generate(PROMPT[:300], max_new_tokens=4, method=SlimInfer()).token_ids == dense
    pruned = engine.generate(PROMPT[:300], max_new_tokens=4, method=SlimInfer(budgets=FRACTIONS))
    # all three paper layers merge into the last layer: its MLP skips pruned rows, the last row is exact
    assert pruned.token_ids[0] == dense[0]
    assert pruned.stats.method_stats["prune_layers"] == [layers - 1]
    assert pruned.stats.method_stats["pruned_tokens"] == [300 - 64 - 44]


def test_tokens_per_layer_follow_the_schedule_in_whole_blocks(deep_engine):
    method = Spy(budgets=FRACTIONS)
    gen = deep_engine.generate(PROMPT, max_new_tokens=2, method=method)
    entering, _ = method.plan(12, len(PROMPT))
    assert entering == [1000] * 5 + [488] * 4 + [232] * 3
    assert gen.stats.prefill_tokens_per_layer == entering
    assert gen.stats.method_stats["pruned_tokens"] == [512, 256, 128]
    # a pruning layer's attention sees every token entering it, its MLP only the kept ones
    assert gen.stats.prefill_mlp_tokens_per_layer == [1000] * 4 + [488] * 4 + [232] * 3 + [104]
    for layer in (4, 8):
        positions = method.policy.stored[layer + 1][1]
        blocks = positions[:-40].view(-1, 64)
        assert torch.equal(blocks, blocks[:, :1] + torch.arange(64))  # whole blocks of original positions
        assert blocks[0, 0] == 0 and blocks[:, 0].remainder(64).eq(0).all()  # sink kept, blocks aligned
        assert positions[-40:].tolist() == list(range(960, 1000))  # the last block kept


def test_kept_tokens_keep_their_original_rope_positions(deep_engine):
    """Keys stored after a pruning layer are the kept tokens' keys rotated at their original positions."""
    method = Spy(budgets=FRACTIONS)
    deep_engine.generate(PROMPT, max_new_tokens=1, method=method)
    model, policy = deep_engine.model, method.policy
    with torch.inference_mode():
        h = model.embed(torch.tensor(PROMPT))
        pos = torch.arange(len(PROMPT))
        for layer in range(12):
            q, k, v = model.qkv(layer, h, pos)
            keys, positions = policy.stored[layer]
            assert torch.equal(positions, pos)
            torch.testing.assert_close(keys, k, rtol=1e-5, atol=1e-5)
            if layer == 5:  # renumbering the compacted rows would give other keys
                renumbered = model.qkv(layer, h, torch.arange(len(pos)))[1]
                assert not torch.allclose(keys, renumbered, atol=1e-3)
            h = model.attention_output(layer, h, model.causal_attention(layer, q, k, v, pos))
            if layer in policy.kept:
                h, pos = h[policy.kept[layer]], pos[policy.kept[layer]]
            h = model.mlp(layer, h)
    assert pos.tolist()[:64] == list(range(64)) and len(pos) == 104


# -- decode ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_swaps_happen_only_when_overlap_falls_below_gamma(deep_engine, gamma):
    method = Spy(budgets=FRACTIONS, gamma=gamma)
    gen = deep_engine.generate(PROMPT, max_new_tokens=16, method=method)
    rescorings = method.policy.rescorings
    assert {layer for _, layer, _, _ in rescorings} == {4, 8, 11}
    swaps = 0
    for (step, layer, active, top), (next_step, next_layer, next_active, _) in zip(
        rescorings, rescorings[3:], strict=False
    ):
        assert (next_step, next_layer) == (step + 1, layer)
        overlap = len(active & top) / len(active)
        swap = overlap < gamma
        swaps += swap
        assert next_active == (top if swap else active)  # a swap installs exactly the new top set
    assert gen.stats.method_stats["decode_rescorings"] == len(rescorings) == 3 * 15
    # the engine counts the copies: one load per swap acted on (the next step starts it, so the last step's swap is
    # the next call's), one row per entering block
    decided = [
        len(top - active)
        for step, _, active, top in rescorings
        if step < 14 and len(active & top) / len(active) < gamma
    ]
    assert round(gen.stats.host_loads_per_step * 15) == len(decided) == swaps
    assert round(gen.stats.host_rows_loaded_per_step * 15) == sum(decided)
    if gamma == 0.0:
        assert not decided and gen.stats.host_bytes_loaded_per_step == 0
    if gamma == 1.0:
        assert decided and gen.stats.host_bytes_loaded_per_step > 0


def test_a_swap_decided_at_the_last_step_of_a_call_is_made_in_the_next_call(deep_engine):
    """A decision is acted on at the next step; across two calls nothing is lost: the same blocks, in the same
    slots, as one call of all the steps."""
    method = f"sliminfer(budgets={FRACTIONS}, gamma=1.0)"
    whole, split = deep_engine.start(PROMPT, method=method), deep_engine.start(PROMPT, method=method)
    tokens = whole.generate(max_new_tokens=12).token_ids
    first = split.generate(max_new_tokens=5)
    assert first.token_ids + split.generate(max_new_tokens=7).token_ids == tokens
    assert first.stats.method_stats["decode_rescorings"] == 3 * 4  # the last step's decision, not yet acted on
    for layer in whole.policy.layers:
        assert torch.equal(split.kv[layer].positions, whole.kv[layer].positions)
        assert torch.equal(split.kv[layer].host_positions, whole.kv[layer].host_positions)
    assert split.policy.stats()["mean_overlap"] == whole.policy.stats()["mean_overlap"] < 1


def test_a_pruning_layer_records_its_inactive_blocks_as_host_resident_through_the_swaps(deep_engine):
    """Issue 11: the layer's KV, not SlimInfer alone, says which positions live on the host; each installed
    swap moves the leaving block's positions there and the entering block's back."""
    method = Spy(budgets=FRACTIONS, gamma=1.0)
    session = deep_engine.start(PROMPT, method=method)
    layers = method.policy.layers
    after_prefill = {layer: session.kv[layer].host_positions.clone() for layer in layers}
    session.generate(max_new_tokens=16)
    swapped = 0
    for layer, store in layers.items():
        kv, blocks = session.kv[layer], torch.arange(len(store.positions))
        inactive = store.positions[~torch.isin(blocks, store.slots)].flatten()
        assert torch.equal(kv.host_positions, inactive.sort().values) and kv.host_count == inactive.numel()
        assert torch.equal(kv.positions[: store.slots.numel() * 64], store.positions[store.slots].flatten())
        assert kv.runs() == [(Kind.PROMPT, len(kv) - 15), (Kind.GENERATED, 15)]
        swapped += not torch.equal(kv.host_positions, after_prefill[layer])
    assert swapped  # some swaps were installed


def test_offload_and_no_offload_give_identical_tokens_and_expected_bytes(deep_engine):
    per_token = deep_engine.model.spec.kv_bytes_per_token(torch.float32)
    new = 16
    runs = {}
    for offload in (True, False):
        method = Spy(budgets=FRACTIONS, gamma=1.0, offload=offload)
        gen = deep_engine.generate(PROMPT, max_new_tokens=new, method=method)
        entering, on_device = method.plan(12, len(PROMPT))
        stored = sum(on_device) + 12 * (new - 1)  # generated tokens: every step but the last is cached
        assert gen.stats.kv_bytes_device == stored * per_token + method.policy.device_bytes()
        runs[offload] = gen
    assert runs[True].token_ids == runs[False].token_ids
    swapped = runs[True].stats  # loads counted by the engine where the copies happen
    assert swapped.host_loads_per_step > 0 and swapped.host_rows_loaded_per_step >= swapped.host_loads_per_step
    assert swapped.host_bytes_loaded_per_step == pytest.approx(swapped.host_rows_loaded_per_step * 64 * per_token)
    assert runs[False].stats.host_bytes_loaded_per_step == 0 == runs[False].stats.host_loads_per_step
    assert runs[False].stats.kv_bytes_host == 0
    # nothing is lost: the host holds every scored block of layers 4, 8 and 11 (15, 7 and 3 blocks)
    assert runs[True].stats.kv_bytes_host == (15 + 7 + 3) * 64 * per_token
    assert runs[True].stats.kv_bytes_device < runs[False].stats.kv_bytes_device
    keys = runs[True].stats.decode_keys_per_layer
    assert keys[4] < keys[3] and keys[8] < keys[7]  # pruning layers attend to their active blocks only


@pytest.mark.parametrize("prompt_len, paper_gb", [(8192, 0.80), (16384, 1.11), (24576, 1.42), (32768, 1.73)])
def test_device_kv_follows_the_papers_memory_figures(prompt_len, paper_gb):
    """Llama-3.1-8B with the default budgets: 1.00 GB of dense KV per 8K tokens; 32K -> 1.73 / 4.00 = 0.433."""
    _, on_device = SlimInfer().plan(32, prompt_len)
    ratio = sum(on_device) / (32 * prompt_len)
    dense_gb = prompt_len / 8192
    assert abs(ratio - paper_gb / dense_gb) <= 0.005 + 64 / prompt_len  # paper's rounding, one block per layer
    if prompt_len == 32768:
        assert round(ratio, 3) == 0.434 and abs(ratio - 0.433) < 64 / prompt_len


def test_cli_runs_sliminfer(capsys):
    assert cli.main(["generate", "--model", "tiny", "--method", "sliminfer", "--prompt", "hello", "--stats"]) == 0
    out = capsys.readouterr().out
    assert "name=sliminfer" in out and "pruned_tokens" in out


def test_bfloat16_offload_matches_no_offload():
    model, tok = presets.build(DEEP, seed=1)
    engine = load(model, tokenizer=tok, dtype="bfloat16")
    method = SlimInfer(budgets=FRACTIONS, gamma=1.0)
    runs = [engine.generate(PROMPT[:400], max_new_tokens=6, method=replace(method, offload=o)) for o in (True, False)]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].stats.method_stats["pruned_tokens"] == [256, 64, 0] and runs[0].stats.kv_bytes_host > 0


def test_offload_and_no_offload_give_identical_logits(deep_engine, dense_tokens):
    """Teacher-forced along the dense tokens, with swaps at every change of the top set."""
    method = SlimInfer(budgets=FRACTIONS, gamma=1.0)
    logits = [
        deep_engine.next_token_logits(PROMPT, dense_tokens, method=replace(method, offload=o)) for o in (True, False)
    ]
    assert torch.equal(logits[0], logits[1])
    dense = deep_engine.next_token_logits(PROMPT, dense_tokens, method="dense")
    assert torch.equal(deep_engine.next_token_logits(PROMPT, dense_tokens, method=SlimInfer.keep_all()), dense)
    assert not torch.allclose(logits[0][1:], dense[1:])  # pruning is visible in decode


# -- the decode side of a composition: the block manager alone, after another prefill ----------------------
SIDE = "sliminfer(budgets=(0.5, 0.25, 0.125), gamma=1.0)"  # gamma 1: a swap at every change of the top set
HELD_AFTER_LAZYLLM = (700, 500, 300)  # prompt entries of layers 4, 8, 11 after LazyLLM's prefill (stages 1-3)


def test_decode_side_after_a_dense_prefill_manages_the_whole_prompts_blocks(deep_engine):
    per_token = deep_engine.model.spec.kv_bytes_per_token(torch.float32)
    session = deep_engine.start(PROMPT, method=f"dense+{SIDE}")
    managed = session.policy.then.layers
    assert sorted(managed) == [4, 8, 11]
    for store in managed.values():  # blocks of the whole prompt: exactly position // 64
        assert torch.equal(store.positions, torch.arange(960).view(15, 64))
    stats = session.generate(max_new_tokens=16).stats
    assert stats.prefill_tokens_per_layer == [1000] * 12  # no hidden state pruned
    decode = stats.method_stats["decode"]
    assert decode["pruned_tokens"] == [0, 0, 0] and decode["inactive_tokens"] == [512, 768, 896]
    keys = stats.decode_keys_per_layer
    assert [keys[0] - keys[layer] for layer in (4, 8, 11)] == pytest.approx([512, 768, 896])
    assert all(keys[layer] == keys[0] for layer in range(12) if layer not in managed)
    assert decode["decode_rescorings"] == 3 * 15 and stats.host_loads_per_step > 0  # swaps, counted by the engine
    assert stats.kv_bytes_host == 3 * 15 * 64 * per_token  # each pruning layer's every block is on the host
    _, on_device = SlimInfer(budgets=FRACTIONS).as_decode_side().plan(12, len(PROMPT))
    assert stats.kv_bytes_device == (sum(on_device) + 12 * 15) * per_token + session.policy.device_bytes()


def test_sliminfer_on_both_sides_with_equal_settings_equals_standalone(deep_engine):
    alone = deep_engine.generate(PROMPT, max_new_tokens=16, method=SIDE).stats
    both = deep_engine.generate(PROMPT, max_new_tokens=16, method=f"{SIDE}+{SIDE}")
    assert both.token_ids == deep_engine.generate(PROMPT, max_new_tokens=16, method=SIDE).token_ids
    for name in ("prefill_tokens_per_layer", "decode_keys_per_layer", "kv_bytes_device", "kv_bytes_host"):
        assert getattr(both.stats, name) == getattr(alone, name), name
    assert both.stats.host_loads_per_step == alone.host_loads_per_step > 0
    sides = both.stats.method_stats
    assert (
        sides["prefill"]["pruned_tokens"] == sides["decode"]["inactive_tokens"] == alone.method_stats["pruned_tokens"]
    )


def test_decode_side_after_lazyllm_selects_among_the_entries_each_layer_holds(deep_engine):
    reference = deep_engine.start(PROMPT, method="lazyllm+dense")
    held = [set(kv.positions.tolist()) for kv in reference.kv]
    assert [len(held[layer]) for layer in (4, 8, 11)] == list(HELD_AFTER_LAZYLLM)
    session = deep_engine.start(PROMPT, method=f"lazyllm+{SIDE}")
    policy = session.policy.then
    for layer, kv in enumerate(session.kv):  # nothing lost: device and host hold what LazyLLM's prefill left
        store = policy.layers.get(layer)
        host = [] if store is None else store.positions.flatten().tolist()
        assert set(kv.positions.tolist()) | set(host) == held[layer]
        if store is not None:  # blocks: 64 consecutive held entries, in position order (not position // 64)
            assert host == sorted(held[layer])[: len(host)] and host[-1] >= len(host)
    contexts = []
    decode_context = policy.decode_context

    def recording(step):
        context = decode_context(step)
        contexts.append((step.layer, context.pos.tolist()))
        return context

    policy.decode_context = recording
    gen = session.generate(max_new_tokens=16)
    inactive = gen.stats.method_stats["decode"]["inactive_tokens"]
    assert inactive == [256, 256, 192]  # 700 -> 444, 500 -> 244, 300 -> 108 active
    assert len(contexts) == 12 * 15
    for layer, positions in contexts:
        prompt = [p for p in positions if p < len(PROMPT)]
        assert len(set(positions)) == len(positions) and set(prompt) <= held[layer]  # only entries the layer has
        assert positions[len(prompt) :] == list(range(len(PROMPT), positions[-1] + 1))  # then every generated one
        if layer in policy.layers:
            assert len(prompt) == len(held[layer]) - inactive[[4, 8, 11].index(layer)]
        else:
            assert set(prompt) == held[layer]
    assert gen.stats.host_loads_per_step > 0


def test_decode_side_budgets_count_what_each_layer_holds(deep_engine):
    """A budget covering everything each pruning layer holds after LazyLLM gives exactly `lazyllm+dense`."""
    lazy = deep_engine.generate(PROMPT, max_new_tokens=16, method="lazyllm+dense")
    covering = deep_engine.generate(
        PROMPT, max_new_tokens=16, method=f"lazyllm+sliminfer(budgets={HELD_AFTER_LAZYLLM})"
    )
    assert covering.token_ids == lazy.token_ids
    assert covering.stats.decode_keys_per_layer == lazy.stats.decode_keys_per_layer
    assert covering.stats.method_stats["decode"]["inactive_tokens"] == [0, 0, 0]
    # the same budgets leave blocks out after a dense prefill, whose layers hold the whole prompt
    dense = deep_engine.generate(PROMPT, max_new_tokens=2, method=f"dense+sliminfer(budgets={HELD_AFTER_LAZYLLM})")
    assert dense.stats.method_stats["decode"]["inactive_tokens"] == [320, 512, 704]


@pytest.mark.parametrize("prefill", ["dense", "lazyllm"])
def test_decode_side_offload_equals_no_offload_bitwise(deep_engine, dense_tokens, prefill):
    """Teacher-forced along the dense tokens, swapping at every change of the top set."""
    spec = f"{prefill}+{SIDE}"
    offloaded = deep_engine.next_token_logits(PROMPT, dense_tokens, method=spec)
    on_device = deep_engine.next_token_logits(PROMPT, dense_tokens, method=spec.replace("(", "(offload=False, ", 1))
    assert torch.equal(offloaded, on_device)
    assert deep_engine.generate(PROMPT, max_new_tokens=8, method=spec).stats.host_loads_per_step > 0


def test_decode_side_takes_a_later_turn_and_never_renumbers(deep_engine):
    session = deep_engine.start(PROMPT, method=f"dense+{SIDE}")
    session.generate(max_new_tokens=4)
    turn = random_prompt(40, seed=9)
    session.extend(turn)
    second = session.generate(max_new_tokens=8)
    assert len(second.token_ids) == 8
    unseen = second.stats.unseen_tokens_per_layer  # the turn sees the active blocks at the pruning layers
    assert [unseen[layer] for layer in (4, 8, 11)] == [512, 768, 896]
    assert all(unseen[layer] == 0 for layer in range(12) if layer not in (4, 8, 11))
    turn_positions = set(range(len(PROMPT) + 3, len(PROMPT) + 3 + len(turn) + 1))  # the last reply token too
    for kv in session.kv:
        positions = kv.positions.tolist()
        assert len(set(positions)) == len(positions) and all(0 <= p < len(session.tokens) for p in positions)
        assert turn_positions <= set(positions)  # a later turn is never pruned


def test_doc_examples_run(capsys):
    """docs/methods/sliminfer.md's programs (the blocks that import tokensieve) run and print."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "methods" / "sliminfer.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    programs = [code for code in blocks if "import tokensieve" in code]
    assert len(programs) >= 2
    for code in programs:
        exec(compile(code, str(doc), "exec"), {})
        assert capsys.readouterr().out


SWAPPING = [f"sliminfer(budgets={FRACTIONS}, gamma=1.0)", f"dense+sliminfer(budgets={FRACTIONS})"]


@pytest.mark.parametrize("spec", SWAPPING)
def test_a_decode_step_reads_nothing_back_at_the_pruning_layers(deep_engine, monkeypatch, spec):
    """Rescoring decides on the device; the host reads the decision's small copy at the next step's start, once
    that step's token has been read (counted on CPU by the calls that would wait on CUDA: see `device_syncs`)."""
    assert deep_engine.generate(PROMPT, max_new_tokens=6, method=spec).stats.host_loads_per_step > 0  # swaps
    assert decode_syncs_per_step(deep_engine, PROMPT, spec, 6, monkeypatch) == {"step": 1.0}
