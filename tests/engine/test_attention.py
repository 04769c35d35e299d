"""`attention.attend`: position masking and hidden keys equal plain softmax attention over the visible keys."""

from __future__ import annotations

import pytest
import torch

import tokensieve
from conftest import deep, random_prompt
from device_syncs import DeviceSyncs, decode_syncs_per_step
from tokensieve import attention, presets
from tokensieve.attention import EXPLICIT_MIN_KEYS, attend, explicit_attention, last_query_probs, visibility_mask


def _reference(q, q_pos, k, v, k_pos, scale, hidden):
    """Each query row alone, keys repeated per head, over the keys it may see."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    rows = []
    for i, p in enumerate(q_pos.tolist()):
        seen = (k_pos <= p) & ~hidden
        rows.append((q[:, i : i + 1] @ k[:, seen].transpose(1, 2) * scale).softmax(-1) @ v[:, seen])
    return torch.cat(rows, 1)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2)])
@pytest.mark.parametrize("queries", [1, 3])
def test_hidden_keys_and_positions_mask_like_a_reference(heads, kv_heads, queries):
    torch.manual_seed(0)
    t, d = 40, 8
    k, v = torch.randn(kv_heads, t, d), torch.randn(kv_heads, t, d)
    k_pos = torch.randperm(t)  # keys need not be sorted
    q = torch.randn(heads, queries, d)
    q_pos = torch.tensor([t - 1 - 7 * i for i in range(queries)]).flip(0)
    hidden = torch.zeros(t, dtype=torch.bool)
    hidden[torch.randperm(t)[:9]] = True
    hidden[k_pos == t - 1] = False  # the newest query always sees itself
    out = attend(q, q_pos, k, v, k_pos, d**-0.5, hidden)
    torch.testing.assert_close(out, _reference(q, q_pos, k, v, k_pos, d**-0.5, hidden), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 1), (6, 2)])
def test_one_query_over_many_keys_takes_the_explicit_path_and_equals_the_reference(heads, kv_heads, monkeypatch):
    torch.manual_seed(2)
    t, d = EXPLICIT_MIN_KEYS, 8
    k, v = torch.randn(kv_heads, t + 5, d)[:, :t], torch.randn(kv_heads, t + 5, d)[:, :t]  # strided, as a cache
    q, q_pos, k_pos = torch.randn(heads, 1, d), torch.tensor([t - 1]), torch.randperm(t)
    taken = []
    monkeypatch.setattr(attention, "explicit_attention", lambda *a: taken.append(1) or explicit_attention(*a))
    out = attend(q, q_pos, k, v, k_pos, d**-0.5, newest=True)
    assert taken == [1]
    reference = _reference(q, q_pos, k, v, k_pos, d**-0.5, torch.zeros(t, dtype=torch.bool))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    attend(q, q_pos, k[:, :-1], v[:, :-1], k_pos[:-1], d**-0.5, newest=True)  # one key fewer: the fused kernel
    assert taken == [1]


def test_hidden_keys_take_no_share_of_the_scores():
    torch.manual_seed(1)
    k, q = torch.randn(2, 30, 8), torch.randn(4, 8)
    hidden = torch.arange(30) % 3 == 0
    probs = last_query_probs(q, k, 0.35, hidden)
    assert torch.all(probs[hidden] == 0)
    torch.testing.assert_close(probs[~hidden], last_query_probs(q, k[:, ~hidden], 0.35))


def test_the_sync_counter_sees_reads_data_shaped_results_and_host_data():
    x = torch.arange(6)
    with DeviceSyncs() as syncs:
        int(x.sum()), bool(x.any()), x.tolist(), x[x > 2], torch.tensor([1, 2]), x.nonzero()
        x[:3], x[torch.arange(2)], torch.nonzero_static(x > 2, size=3)  # none of these waits
    assert syncs.counts[None] == 6


@pytest.mark.parametrize("hidden", [False, True])
def test_a_window_masks_a_decode_query_without_a_device_sync(hidden):
    """The window mask is built on the device, never after asking whether any key lies outside it."""
    k_pos, q_pos = torch.randperm(100), torch.tensor([99])
    hidden_keys = k_pos % 7 == 0 if hidden else None
    with DeviceSyncs() as syncs:
        mask = visibility_mask(q_pos, k_pos, hidden_keys, window=48, newest=True)
    assert sum(syncs.counts.values()) == 0
    expected = (k_pos > 99 - 48) & (~hidden_keys if hidden else True)
    assert torch.equal(mask[0], expected)


@pytest.mark.parametrize("spec", ["dense", "omnikv(budget=32)", "lazyllm(revive_per_step=1)"])
def test_windowed_and_soft_capped_layers_decode_without_a_device_sync(monkeypatch, spec):
    """Gemma 2's local layers (a window shorter than the prompt) and soft-capping: no layer syncs, but
    LazyLLM's boundaries (once each)."""
    model, tokenizer = presets.build(deep("gemma2-softcap-local-global"), seed=1)
    engine = tokensieve.load(model, tokenizer=tokenizer)
    per_step = decode_syncs_per_step(engine, random_prompt(200, seed=3), spec, 4, monkeypatch)
    boundaries = [2, 6, 9] if spec.startswith("lazyllm") else []
    assert per_step == {"step": 1.0, **dict.fromkeys(boundaries, 1.0)}
