"""Attention of some queries over a subset of keys, masked by original positions, and cheap scoring.

Every function takes queries `[heads, m, head_dim]` and keys/values `[kv_heads, t, head_dim]`; grouped
query attention maps query head `h` to KV head `h // group` by reshaping the queries, never by repeating
keys or values. No scoring function builds an `n x n` matrix: scores come from a few query rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention of rows sorted by position (prefill, also after compaction)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=True)[0]


def attend(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Queries at positions `q_pos` attend to keys at `k_pos`, each seeing only keys with position <= its own
    and none of the keys marked `hidden` (bool `[t]`, optional).

    Keys need not be sorted (revived tokens are appended after newer ones). When every key is visible
    to every query (the usual decode step) no mask is built.
    """
    mask = None
    if q.shape[1] > 1 or bool((k_pos > q_pos.min()).any()):
        mask = k_pos[None, :] <= q_pos[:, None]
    if hidden is not None:
        mask = ~hidden[None, :] if mask is None else mask & ~hidden[None, :]
    if mask is not None:
        mask = mask[None, None]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]


def grouped_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Pre-softmax logits `[heads, m, t]` of queries `[heads, m, d]` over keys `[kv_heads, t, d]`, in fp32."""
    heads, m, d = q.shape
    kv_heads = k.shape[0]
    grouped = q.float().reshape(kv_heads, heads // kv_heads * m, d)
    logits = grouped @ k.float().transpose(1, 2) * scale
    return logits.reshape(heads, m, -1)


def last_query_probs(
    q_last: torch.Tensor, k: torch.Tensor, scale: float, hidden: torch.Tensor | None = None
) -> torch.Tensor:
    """LazyLLM's importance: attention probability from one query `[heads, d]` to each key, mean over heads
    (keys marked `hidden` get probability 0 and take no share of the softmax)."""
    logits = grouped_logits(q_last[:, None], k, scale)
    if hidden is not None:
        logits = logits.masked_fill(hidden, float("-inf"))
    return logits.softmax(-1).mean(0)[0]


def max_head_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """OmniKV's "last" selector: pre-softmax logit of one query `[heads, d]` per key, max over heads."""
    return grouped_logits(q[:, None], k, scale).amax(0)[0]


# Query rows scored at once by `attention_received`: at most this many rows, and about this many fp32 logits.
SCORE_CHUNK_ROWS = 256
SCORE_CHUNK_ELEMENTS = 1 << 24


def attention_received(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    keys_are_rows: bool = False,
) -> torch.Tensor:
    """Attention `[heads, t]` each key received from the queries `[heads, m, d]`, summed over the queries:
    softmax over the keys each query sees (causal by position). SnapKV's observation window, H2O's heavy
    hitters (prefill, decode and later turns) all score with this.

    Queries go in chunks, so `m x t` logits never exist at once. `keys_are_rows` says that the keys are the
    queries' own rows, sorted by position (prefill): query rows `[a, b)` then see only key rows `[0, b)`, so
    only those are scored (about half the work of the full square).
    """
    heads, m, _ = q.shape
    t = k.shape[1]
    total = torch.zeros(heads, t, dtype=torch.float32, device=k.device)
    chunk = max(1, min(SCORE_CHUNK_ROWS, SCORE_CHUNK_ELEMENTS // (heads * t)))
    for start in range(0, m, chunk):
        end = min(m, start + chunk)
        keys = end if keys_are_rows else t
        logits = grouped_logits(q[:, start:end], k[:, :keys], scale)
        logits.masked_fill_(k_pos[None, None, :keys] > q_pos[None, start:end, None], float("-inf"))
        total[:, :keys] += logits.softmax(-1).sum(1)
    return total
