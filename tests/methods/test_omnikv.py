"""OmniKV: exactness at full budget, selection vs a brute-force reference, offload, memory accounting."""

from __future__ import annotations

import pytest
import torch

import tokensieve
from conftest import random_prompt
from tokensieve import presets
from tokensieve.cache import Kind, LayerKV
from tokensieve.methods import LayerStep, OmniKV, Rows, Run
from tokensieve.methods.omnikv import SELECTORS, plan_layers, score_prompt

PROMPT = random_prompt(256, seed=11)
NEW_TOKENS = 8
BUDGET = 24


class Spy(OmniKV):
    """OmniKV that keeps its policy and each sparse layer's prompt KV before it leaves the device."""

    def start(self, run: Run):
        self.policy = super().start(run)
        self.prompt_kv = {}
        prefill_layer_done = self.policy.prefill_layer_done

        def record(step):
            self.prompt_kv[step.layer] = (step.kv.keys.clone(), step.kv.values.clone())
            prefill_layer_done(step)

        self.policy.prefill_layer_done = record
        return self.policy


@pytest.fixture(scope="module")
def dense_tokens(deep_engine):
    return deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("selector", SELECTORS)
def test_budget_covering_prompt_gives_dense_tokens(deep_engine, dense_tokens, selector, offload):
    budget = 1.0 if offload else len(PROMPT) + 50  # a fraction and a count beyond the prompt
    gen = deep_engine.generate(
        PROMPT, max_new_tokens=NEW_TOKENS, method=OmniKV(budget=budget, selector=selector, offload=offload)
    )
    assert gen.token_ids == dense_tokens
    assert gen.stats.method_stats["prompt_fraction_selected"] == 1.0  # prunes nothing, and says so


@pytest.mark.parametrize("selector", SELECTORS)
def test_offload_and_no_offload_give_identical_tokens(deep_engine, selector):
    runs = [
        deep_engine.generate(
            PROMPT, max_new_tokens=NEW_TOKENS, method=OmniKV(budget=BUDGET, selector=selector, offload=offload)
        )
        for offload in (True, False)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].stats.decode_keys_per_layer == runs[1].stats.decode_keys_per_layer


def test_sparse_layers_attend_budget_plus_generated_tokens(deep_engine):
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=OmniKV(budget=BUDGET))
    plan = OmniKV().layer_plan(12)
    assert plan.filter_layers == (1, 3, 7)  # 2, 8, 18 of 32 scaled to 12 layers
    steps = gen.stats.new_tokens - 1
    generated = sum(range(1, steps + 1)) / steps  # step s attends s generated tokens (its own included)
    for layer, keys in enumerate(gen.stats.decode_keys_per_layer):
        expected = BUDGET if layer in plan.sparse_layers else len(PROMPT)
        assert keys == pytest.approx(expected + generated)


def brute_force_scores(selector, queries, keys, scale):
    """Reference: repeat K/V per query head, full logits, then the selector's reduction."""
    group = queries.shape[0] // keys.shape[0]
    logits = torch.einsum("hmd,htd->hmt", queries, keys.repeat_interleave(group, 0)) * scale
    if selector == "last":
        return logits[:, -1].max(0).values
    per_query = logits.softmax(-1).max(0).values  # [m, t]
    if selector == "softmax_last":
        return per_query[-1]
    m = per_query.shape[0]
    weights = [1.0 if selector == "uniform" else 2.0 ** -(m - 1 - i) for i in range(m)]
    return sum(w * row for w, row in zip(weights, per_query, strict=True))


@pytest.mark.parametrize("selector", SELECTORS)
def test_scores_match_brute_force_reference_with_gqa(selector):
    gen = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(8, 5, 16, generator=gen), torch.randn(2, 200, 16, generator=gen)
    expected = brute_force_scores(selector, queries, keys, 0.25)
    torch.testing.assert_close(score_prompt(selector, queries, keys, 0.25), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offload", [True, False])
def test_policy_selects_reference_top_k_and_serves_those_rows(deep_engine, offload):
    """Drive a policy by hand: selection at a filter layer, and the keys a sparse layer then sees."""
    spec, n, budget = deep_engine.model.spec, 200, 17
    method = OmniKV(budget=budget, offload=offload)
    policy = method.start(Run(spec, n, torch.device("cpu"), torch.float32, spec.head_dim**-0.5))
    plan, gen = policy.plan, torch.Generator().manual_seed(1)
    caches, prompt = [], {}
    for layer in range(spec.num_layers):
        kv = LayerKV(spec.num_kv_heads, spec.head_dim, torch.float32, torch.device("cpu"))
        k, v = (torch.randn(spec.num_kv_heads, n, spec.head_dim, generator=gen) for _ in "kv")
        kv.append(k, v, torch.arange(n), Kind.PROMPT)
        policy.prefill_layer_done(LayerStep(layer, Rows(torch.zeros(n, 1), torch.arange(n)), k, k, kv))
        caches.append(kv)
        prompt[layer] = (k, v)
    f = plan.filter_layers[-1]
    sparse = plan.segments[f][0]
    for layer in (f, sparse):  # the new token's KV at position n
        new_k, new_v = (torch.randn(spec.num_kv_heads, 1, spec.head_dim, generator=gen) for _ in "kv")
        caches[layer].append(new_k, new_v, torch.tensor([n]), Kind.GENERATED)
    q = torch.randn(spec.num_heads, 1, spec.head_dim, generator=gen)
    new_rows = Rows(torch.zeros(1, 1), torch.tensor([n]))
    policy.decode_context(LayerStep(f, new_rows, q, q, caches[f]))
    reference = brute_force_scores("last", q, prompt[f][0], policy.run.scale).topk(budget).indices.sort().values
    assert torch.equal(policy.selected[f], reference)
    context = policy.decode_context(LayerStep(sparse, new_rows, q, q, caches[sparse]))
    assert torch.equal(context.pos, torch.cat([reference, torch.tensor([n])]))
    assert torch.equal(context.k[:, :budget], prompt[sparse][0][:, reference])
    assert torch.equal(context.v[:, :budget], prompt[sparse][1][:, reference])
    assert torch.equal(context.k[:, budget:], caches[sparse].keys[:, -1:])
    assert len(caches[sparse]) == (1 if offload else n + 1)  # with offload the device holds only the tail
    assert torch.equal(caches[sparse].host_positions, torch.arange(n if offload else 0))  # ... the rest the host


def test_host_store_is_packed_complete_and_never_shrinks(deep_engine):
    spy = Spy(budget=BUDGET)
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=spy)
    policy, n = spy.policy, len(PROMPT)
    assert policy.steps == gen.stats.new_tokens - 1 > 0
    for store in policy.stores.values():
        assert store.host.tensor.shape[:2] == (n, len(store.layers))
        for layer in store.layers:
            keys, values = spy.prompt_kv[layer]
            assert torch.equal(store.host.tensor[:, store.slot[layer], 0], keys.transpose(0, 1))
            assert torch.equal(store.host.tensor[:, store.slot[layer], 1], values.transpose(0, 1))
    assert gen.stats.kv_bytes_host == sum(s.nbytes for s in policy.stores.values())
    row_bytes = sum(s.row_bytes for s in policy.stores.values())
    assert gen.stats.host_bytes_loaded_per_step == BUDGET * row_bytes


@pytest.mark.parametrize("offload", [True, False])
def test_device_kv_bytes_follow_the_formula(deep_engine, offload):
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=OmniKV(budget=BUDGET, offload=offload))
    spec, n, steps = deep_engine.model.spec, len(PROMPT), gen.stats.new_tokens - 1
    per_token = spec.kv_bytes_per_token(torch.float32)
    plan = OmniKV().layer_plan(spec.num_layers)
    if offload:
        device = len(plan.dense_layers) * (n + steps) + len(plan.sparse_layers) * steps
        host = len(plan.sparse_layers) * n
    else:
        device, host = spec.num_layers * (n + steps), 0
    assert gen.stats.kv_bytes_device == device * per_token
    assert gen.stats.kv_bytes_host == host * per_token


def test_paper_layers_keep_a_quarter_of_prompt_kv_on_device_at_32_layers():
    plan = OmniKV().layer_plan(32)
    assert plan.dense_layers == (0, 1, 2, 3, 8, 9, 18, 19)
    assert len(plan.sparse_layers) == 24
    shape = dict(num_hidden_layers=32, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    model, tok = presets.build({**shape, "num_key_value_heads": 2}, max_positions=256)
    gen = tokensieve.load(model, tokenizer=tok).generate(random_prompt(64), max_new_tokens=1, method="omnikv")
    share = gen.stats.kv_bytes_device / (gen.stats.kv_bytes_device + gen.stats.kv_bytes_host)
    assert share == 8 / 32


def test_layer_plan_with_more_wait_layers_and_adjacent_filters():
    plan = plan_layers((1, 2, 6), wait_layers=2, num_layers=10)
    assert plan.dense_layers == (0, 1, 2, 3, 4, 6, 7, 8)
    assert plan.segments == {1: (), 2: (5,), 6: (9,)}
    assert plan.segment_of(5) == 2 and plan.segment_of(3) is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(budget=0), "budget must be > 0"),
        (dict(budget=-0.5), "budget must be > 0"),
        (dict(budget=1.5), "float above 1"),
        (dict(selector="first"), "unknown selector 'first'"),
        (dict(window=0), "window must be an int >= 1"),
        (dict(wait_layers=-1), "wait_layers must be an int >= 0"),
        (dict(filter_layers=()), "filter_layers must be non-empty"),
    ],
)
def test_bad_settings_are_clear_errors(settings, message):
    with pytest.raises((ValueError, TypeError), match=message):
        OmniKV(**settings)


def test_filter_layer_beyond_the_model_is_a_clear_error(deep_engine):
    with pytest.raises(ValueError, match=r"within 0\.\.11"):
        deep_engine.generate(PROMPT[:20], max_new_tokens=2, method=OmniKV(filter_layers=(2, 12)))
