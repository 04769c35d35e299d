"""Token-dropping baselines: StreamingLLM, SnapKV and H2O keep exactly their budgets and score like references."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import random_prompt
from tokensieve import attention
from tokensieve.cache import Kind, LayerKV
from tokensieve.cli import main
from tokensieve.methods import H2O, METHODS, Context, LayerStep, Method, Policy, Rows, Run, SnapKV, StreamingLLM
from tokensieve.methods import h2o as h2o_module
from tokensieve.methods.snapkv import observation_scores, pool_scores

PROMPT = random_prompt(200, seed=5)
NEW_TOKENS = 6


def record(method: Method) -> dict:
    """Wrap `method` so each generation records every layer's cache after prefill and at each decode step.

    Also keeps layer inputs of prefill (queries, keys, positions) and each layer's KV before eviction.
    """
    seen: dict = {"prefill": {}, "decode": [], "inputs": {}, "before": {}}
    start = method.start

    def recording_start(run):
        policy = start(run)
        observe, done, context = policy.prefill_observe, policy.prefill_layer_done, policy.decode_context

        def prefill_observe(step):
            seen["inputs"][step.layer] = (step.q.clone(), step.k.clone(), step.rows.pos.clone())
            observe(step)

        def prefill_layer_done(step):
            seen["before"][step.layer] = (step.kv.keys.clone(), step.kv.positions.clone())
            done(step)
            seen["prefill"][step.layer] = (step.kv.keys.clone(), step.kv.positions.clone())

        def decode_context(step):
            result = context(step)
            kv = step.kv
            seen["decode"].append((step.layer, len(kv), kv.positions.clone(), int(step.rows.pos[-1])))
            return result

        policy.prefill_observe = prefill_observe
        policy.prefill_layer_done = prefill_layer_done
        policy.decode_context = decode_context
        return policy

    method.start = recording_start
    return seen


@pytest.fixture(scope="module")
def dense_tokens(deep_engine):
    return deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method="dense").token_ids


@pytest.fixture(scope="module")
def dense_logits(deep_engine, dense_tokens):
    """Teacher-forced dense logits along the dense tokens: row 0 from prefill, the rest from decode steps."""
    return deep_engine.next_token_logits(PROMPT, dense_tokens, method="dense")


def test_baselines_are_registered_by_name():
    assert METHODS["streaming_llm"] is StreamingLLM and METHODS["snapkv"] is SnapKV and METHODS["h2o"] is H2O


# -- StreamingLLM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sink, window", [(4, 60), (0, 33), (4, 0.25)])
def test_streaming_keeps_sink_and_recent_window_at_every_step(deep_engine, sink, window):
    method = StreamingLLM(sink=sink, window=window)
    seen = record(method)
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=method)
    n, layers = len(PROMPT), deep_engine.model.spec.num_layers
    recent = window if isinstance(window, int) else round(window * n)
    capacity = sink + recent

    for layer in range(layers):
        _, positions = seen["prefill"][layer]
        assert positions.tolist() == list(range(sink)) + list(range(n - recent, n))
    assert len(seen["decode"]) == layers * (gen.stats.new_tokens - 1)
    for _, length, positions, newest in seen["decode"]:
        assert length == capacity
        assert sorted(positions.tolist()) == list(range(sink)) + list(range(newest - recent + 1, newest + 1))

    stats = gen.stats.method_stats
    steps = gen.stats.new_tokens - 1
    assert stats["cache_capacity_tokens"] == capacity
    assert stats["kept_after_prefill_per_layer"] == [capacity] * layers
    assert stats["evicted_in_prefill_per_layer"] == [n - capacity] * layers
    assert stats["evicted_in_decode_per_layer"] == [steps] * layers
    assert gen.stats.decode_keys_per_layer == [capacity] * layers
    assert gen.stats.kv_bytes_device == layers * capacity * deep_engine.model.spec.kv_bytes_per_token(torch.float32)


def test_streaming_prompt_within_capacity_is_kept_until_decode_fills_the_cache(deep_engine):
    prompt = PROMPT[:50]
    method = StreamingLLM(sink=4, window=50)
    gen = deep_engine.generate(prompt, max_new_tokens=12, method=method)
    layers = deep_engine.model.spec.num_layers
    stats = gen.stats.method_stats
    assert stats["evicted_in_prefill_per_layer"] == [0] * layers
    # 11 decode steps grow the cache to 61 entries; the capacity is 54.
    assert stats["evicted_in_decode_per_layer"] == [61 - 54] * layers
    assert stats["cache_tokens_per_layer"] == [54] * layers


@dataclass
class AttendSinkAndRecent(Method):
    """Reference: evict nothing, but let each decode step read only the sink and recent slots."""

    sink: int = 4
    window: int = 60

    def start(self, run):
        method = self

        class Reference(Policy):
            def decode_context(self, step):
                kv = step.kv
                slots = list(range(method.sink)) + list(range(len(kv) - method.window, len(kv)))
                return Context.of(kv, torch.tensor(slots))

        return Reference(run)


def test_streaming_equals_attending_to_sink_and_window_of_a_full_cache(deep_engine, dense_tokens, dense_logits):
    """Eviction keeps exactly the entries the method means to read: same logits as a non-evicting reference."""
    ours = deep_engine.next_token_logits(PROMPT, dense_tokens, method=StreamingLLM(sink=4, window=60))
    reference = deep_engine.next_token_logits(PROMPT, dense_tokens, method=AttendSinkAndRecent(4, 60))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[0], dense_logits[0], rtol=0, atol=1e-5)  # prefill is dense
    assert (ours[1:] - dense_logits[1:]).abs().amax() > 1e-3  # and dropping 136 of 200 tokens changes decode


def test_streaming_keep_all_is_dense_and_says_it_evicted_nothing(deep_engine, dense_tokens):
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=StreamingLLM.keep_all())
    layers = deep_engine.model.spec.num_layers
    assert gen.token_ids == dense_tokens
    assert gen.stats.method_stats["cache_capacity_tokens"] is None
    assert gen.stats.method_stats["evicted_in_prefill_per_layer"] == [0] * layers
    assert gen.stats.method_stats["evicted_in_decode_per_layer"] == [0] * layers


@pytest.mark.parametrize(
    "settings, error, match",
    [
        (dict(sink=-1), ValueError, "sink must be an int >= 0"),
        (dict(sink=2.0), ValueError, "sink must be an int >= 0"),
        (dict(window=0), ValueError, "window must be > 0"),
        (dict(window=1.5), ValueError, "window 1.5 is a float above 1"),
        (dict(window="all"), TypeError, "window must be a token count"),
    ],
)
def test_streaming_bad_settings_are_clear_errors(settings, error, match):
    with pytest.raises(error, match=match):
        StreamingLLM(**settings)


# -- SnapKV ----------------------------------------------------------------------------------------------


def brute_force_scores(q, q_pos, k, k_pos, scale, window, kernel, pooling):
    """The paper's scoring spelled out: full causal attention per query head (K repeated for GQA), the
    window's rows summed, query heads averaged per KV head, prefix columns pooled one by one."""
    heads, kv_heads = q.shape[0], k.shape[0]
    group = heads // kv_heads
    k_full = k.repeat_interleave(group, dim=0).double()
    logits = q.double() @ k_full.transpose(1, 2) * scale
    logits = logits.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    received = logits.softmax(-1)[:, -window:].sum(1)
    per_kv_head = received.reshape(kv_heads, group, -1).mean(1)[:, :-window]
    t, half = per_kv_head.shape[1], kernel // 2
    pooled = torch.empty_like(per_kv_head)
    for j in range(t):
        neighbours = per_kv_head[:, max(0, j - half) : j + half + 1]
        pooled[:, j] = neighbours.amax(1) if pooling == "max" else neighbours.sum(1) / kernel
    return pooled


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_snapkv_scores_equal_brute_force_reference(pooling, kv_heads):
    gen = torch.Generator().manual_seed(kv_heads)
    heads, n, d, window, kernel = 8, 90, 16, 12, 5
    q = torch.randn(heads, n, d, generator=gen)
    k = torch.randn(kv_heads, n, d, generator=gen)
    pos = torch.randperm(400, generator=gen)[:n].sort().values  # gaps, as after a prefill pruning method
    scale = d**-0.5
    scores = observation_scores(q[:, -window:], pos[-window:], k, pos, scale)
    ours = pool_scores(scores[:, :-window], kernel, pooling)
    reference = brute_force_scores(q, pos, k, pos, scale, window, kernel, pooling)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-7)


def test_snapkv_keeps_reference_top_tokens_per_kv_head_plus_window(deep_engine):
    budget, window, kernel = 80, 16, 7
    method = SnapKV(budget=budget, window=window, kernel=kernel, pooling="avg")
    seen = record(method)
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=method)
    n, layers, scale = len(PROMPT), deep_engine.model.spec.num_layers, deep_engine.model.scale

    for layer in range(layers):
        q, k, pos = seen["inputs"][layer]
        keys_before, _ = seen["before"][layer]
        keys_after, positions = seen["prefill"][layer]
        scores = brute_force_scores(q, pos, k, pos, scale, window, kernel, "avg")
        top = scores.topk(budget - window, dim=-1).indices.sort(-1).values
        slots = torch.cat([top, torch.arange(n - window, n).expand(k.shape[0], -1)], dim=-1)
        expected = keys_before.gather(1, slots[..., None].expand(-1, -1, keys_before.shape[-1]))
        assert keys_after.shape[1] == budget
        assert torch.equal(keys_after, expected)
        assert torch.equal(keys_after[:, -window:], keys_before[:, -window:])  # the window, in every head
        assert positions[-window:].tolist() == list(range(n - window, n))
        assert int(positions.max()) < n  # placeholders never hide a prompt key from a decode query

    for _, length, _, newest in seen["decode"]:
        assert length == budget + newest - n + 1  # generated tokens are never evicted
    stats = gen.stats.method_stats
    assert stats["budget_tokens"] == budget
    assert stats["kept_per_kv_head_per_layer"] == [budget] * layers
    assert stats["evicted_per_kv_head_per_layer"] == [n - budget] * layers
    assert all(budget <= distinct <= 2 * budget for distinct in stats["distinct_kept_per_layer"])
    assert any(distinct > budget for distinct in stats["distinct_kept_per_layer"])  # heads differ
    entries = budget + gen.stats.new_tokens - 1
    assert gen.stats.kv_bytes_device == layers * entries * deep_engine.model.spec.kv_bytes_per_token(torch.float32)


def test_snapkv_max_pooling_keeps_a_top_set(deep_engine):
    """With max pooling ties are common; whatever the tie-break, nothing evicted outscores what is kept."""
    method = SnapKV(budget=0.3, window=32)
    seen = record(method)
    gen = deep_engine.generate(PROMPT, max_new_tokens=3, method=method)
    n, scale = len(PROMPT), deep_engine.model.scale
    assert gen.stats.method_stats["budget_tokens"] == 60
    for layer, (q, k, pos) in seen["inputs"].items():
        keys_before, _ = seen["before"][layer]
        keys_after, _ = seen["prefill"][layer]
        scores = brute_force_scores(q, pos, k, pos, scale, 32, 7, "max")
        for head in range(k.shape[0]):
            kept = (keys_before[head, : n - 32, None] == keys_after[head, None, :-32]).all(-1).any(-1)
            assert int(kept.sum()) == 60 - 32
            assert scores[head, kept].min() >= scores[head, ~kept].max() - 1e-12


def test_snapkv_prompt_within_budget_is_kept_whole(deep_engine, dense_tokens):
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=SnapKV(budget=len(PROMPT)))
    layers = deep_engine.model.spec.num_layers
    assert gen.token_ids == dense_tokens
    assert gen.stats.method_stats["evicted_per_kv_head_per_layer"] == [0] * layers
    assert gen.stats.method_stats["kept_per_kv_head_per_layer"] == [len(PROMPT)] * layers


def test_snapkv_prefill_is_dense_and_dropping_changes_decode(deep_engine, dense_tokens, dense_logits):
    ours = deep_engine.next_token_logits(PROMPT, dense_tokens, method=SnapKV(budget=48, window=16))
    torch.testing.assert_close(ours[0], dense_logits[0], rtol=0, atol=1e-5)
    assert (ours[1:] - dense_logits[1:]).abs().amax() > 1e-3


@pytest.mark.parametrize(
    "settings, error, match",
    [
        (dict(budget=32), ValueError, "budget 32 must exceed the observation window 32"),
        (dict(budget=0), ValueError, "budget must be > 0"),
        (dict(budget=2.0), ValueError, "budget 2.0 is a float above 1"),
        (dict(window=0), ValueError, "window must be an int >= 1"),
        (dict(kernel=4), ValueError, "kernel must be an int >= 1 and odd"),
        (dict(pooling="mean"), ValueError, "pooling must be one of max, avg"),
    ],
)
def test_snapkv_bad_settings_are_clear_errors(settings, error, match):
    with pytest.raises(error, match=match):
        SnapKV(**settings)


def test_snapkv_fraction_below_the_window_is_a_clear_error(deep_engine):
    with pytest.raises(ValueError, match="is 20 tokens, not more than the observation window 32"):
        deep_engine.generate(PROMPT, max_new_tokens=2, method=SnapKV(budget=0.1))


# -- H2O -------------------------------------------------------------------------------------------------


def brute_force_accumulated(q, k, pos, scale):
    """Column sums of the full causal attention per query head (K repeated), summed per KV head."""
    group = q.shape[0] // k.shape[0]
    logits = q.double() @ k.repeat_interleave(group, dim=0).double().transpose(1, 2) * scale
    logits = logits.masked_fill(pos[None, None, :] > pos[None, :, None], float("-inf"))
    return logits.softmax(-1).sum(1).reshape(k.shape[0], group, -1).sum(1)


@pytest.mark.parametrize("chunk_rows, chunk_elements", [(256, 1 << 24), (16, 1 << 24), (256, 300)])
def test_h2o_prefill_scores_equal_brute_force_in_any_chunking(monkeypatch, chunk_rows, chunk_elements):
    monkeypatch.setattr(attention, "SCORE_CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(attention, "SCORE_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(8, 70, 16, generator=gen), torch.randn(2, 70, 16, generator=gen)
    pos = torch.randperm(200, generator=gen)[:70].sort().values
    ours = h2o_module.per_kv_head(attention.attention_received(q, pos, k, pos, 0.25, keys_are_rows=True), 2)
    torch.testing.assert_close(ours.double(), brute_force_accumulated(q, k, pos, 0.25), rtol=1e-5, atol=1e-6)


def test_h2o_evicts_like_a_per_head_reference_through_prefill_and_decode(deep_engine):
    """Drive one layer of the policy by hand and replay H2O per KV head with explicit per-head caches."""
    spec = deep_engine.model.spec
    kv_heads, heads, d, n, budget, recent, steps = spec.num_kv_heads, spec.num_heads, spec.head_dim, 40, 12, 4, 6
    scale = d**-0.5
    run = Run(spec, n, torch.device("cpu"), torch.float32, scale)
    policy = H2O(budget=budget, recent_ratio=recent / budget).start(run)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (
        torch.randn(heads, n, d, generator=gen),
        torch.randn(kv_heads, n, d, generator=gen),
        torch.randn(kv_heads, n, d),
    )
    pos = torch.arange(n)
    kv = LayerKV(kv_heads, d, torch.float32, torch.device("cpu"))
    kv.append(k, v, pos, Kind.PROMPT)
    step = LayerStep(0, Rows(torch.zeros(n, 1), pos), q, k, kv)
    policy.prefill_observe(step)
    assert policy.prefill_keep_after_attention(step) is None  # H2O evicts KV, never hidden states
    policy.prefill_layer_done(step)

    # reference: per KV head, a dict position -> (key, accumulated score)
    scores = brute_force_accumulated(q, k, pos, scale)
    cache = []
    for head in range(kv_heads):
        top = scores[head, : n - recent].topk(budget - recent).indices.tolist()
        cache.append({p: (k[head, p], scores[head, p]) for p in sorted(top) + list(range(n - recent, n))})

    def check():  # slots may be in any order (decode evicts in place), but each head's entries must match
        assert len(kv) == budget
        for head in range(kv_heads):
            held = policy.positions[0][head].tolist()
            assert sorted(held) == sorted(cache[head])
            assert torch.equal(kv.keys[head], torch.stack([cache[head][p][0] for p in held]))
        assert kv.positions.tolist() == policy.positions[0].amax(0).tolist()

    check()
    group = heads // kv_heads
    for step in range(steps):
        p = n + step
        q_new, k_new = torch.randn(heads, 1, d, generator=gen), torch.randn(kv_heads, 1, d, generator=gen)
        kv.append(k_new, torch.randn(kv_heads, 1, d), torch.tensor([p]), Kind.GENERATED)
        rows = Rows(torch.zeros(1, 1), torch.tensor([p]))
        decode = LayerStep(0, rows, q_new, k_new, kv)
        policy.decode_layer_done(decode, policy.decode_context(decode))
        for head in range(kv_heads):
            cache[head][p] = (k_new[head, 0], 0.0)
            order = sorted(cache[head])
            keys = torch.stack([cache[head][x][0] for x in order]).double()
            probs = (q_new[head * group : (head + 1) * group, 0].double() @ keys.T * scale).softmax(-1).sum(0)
            for x, prob in zip(order, probs, strict=True):
                cache[head][x] = (cache[head][x][0], cache[head][x][1] + prob)
            candidates = order[: len(order) - recent]
            del cache[head][min(candidates, key=lambda x: cache[head][x][1])]
        check()
    stats = policy.stats()
    assert stats["evicted_in_prefill_per_layer"][0] == n - budget
    assert stats["evicted_in_decode_per_layer"][0] == steps


def test_h2o_generation_keeps_its_budget_and_reports_it(deep_engine):
    method = H2O(budget=0.25)
    seen = record(method)
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=method)
    layers, budget = deep_engine.model.spec.num_layers, 50
    for layer in range(layers):
        _, positions = seen["prefill"][layer]
        assert len(positions) == budget
        assert positions[-25:].tolist() == list(range(len(PROMPT) - 25, len(PROMPT)))  # the recent half
    for _, length, _, _ in seen["decode"]:
        assert length == budget + 1  # the new entry is attended, then one entry is evicted
    stats = gen.stats.method_stats
    assert stats["budget_tokens"] == budget and stats["recent_tokens"] == 25
    assert stats["kept_after_prefill_per_layer"] == [budget] * layers
    assert stats["evicted_in_prefill_per_layer"] == [len(PROMPT) - budget] * layers
    assert stats["evicted_in_decode_per_layer"] == [gen.stats.new_tokens - 1] * layers
    assert gen.stats.decode_keys_per_layer == [budget + 1] * layers
    assert gen.stats.kv_bytes_device == layers * budget * deep_engine.model.spec.kv_bytes_per_token(torch.float32)


def test_h2o_keep_all_is_dense_and_says_it_evicted_nothing(deep_engine, dense_tokens):
    gen = deep_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=H2O.keep_all())
    layers = deep_engine.model.spec.num_layers
    assert gen.token_ids == dense_tokens
    assert gen.stats.method_stats["budget_tokens"] is None
    assert gen.stats.method_stats["evicted_in_decode_per_layer"] == [0] * layers


@pytest.mark.parametrize(
    "settings, error, match",
    [
        (dict(budget=0), ValueError, "budget must be > 0"),
        (dict(budget=1.5), ValueError, "budget 1.5 is a float above 1"),
        (dict(recent_ratio=0.0), ValueError, "recent_ratio must be in"),
        (dict(recent_ratio="half"), TypeError, "recent_ratio must be a number"),
    ],
)
def test_h2o_bad_settings_are_clear_errors(settings, error, match):
    with pytest.raises(error, match=match):
        H2O(**settings)


# -- CLI ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, stat",
    [("streaming_llm", "evicted_in_prefill_per_layer"), ("snapkv", "budget_tokens"), ("h2o", "recent_tokens")],
)
def test_cli_runs_each_baseline_and_prints_its_stats(capsys, name, stat):
    argv = ["generate", "--model", "tiny", "--prompt", "hello " * 20, "--max-new-tokens", "3", "--method", name]
    assert main([*argv, "--stats", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"name={name}" in out and stat in out
