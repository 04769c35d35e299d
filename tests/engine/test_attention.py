"""`attention.attend`: position masking and hidden keys equal plain softmax attention over the visible keys."""

from __future__ import annotations

import pytest
import torch

from tokensieve.attention import attend, last_query_probs


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


def test_hidden_keys_take_no_share_of_the_scores():
    torch.manual_seed(1)
    k, q = torch.randn(2, 30, 8), torch.randn(4, 8)
    hidden = torch.arange(30) % 3 == 0
    probs = last_query_probs(q, k, 0.35, hidden)
    assert torch.all(probs[hidden] == 0)
    torch.testing.assert_close(probs[~hidden], last_query_probs(q, k[:, ~hidden], 0.35))
