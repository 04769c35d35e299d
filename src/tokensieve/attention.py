"""Attention of some queries over a subset of keys, masked by original positions, and cheap scoring.

Every function takes queries `[heads, m, head_dim]` and keys/values `[kv_heads, t, head_dim]`; grouped
query attention maps query head `h` to KV head `h // group` by reshaping the queries, never by repeating
keys or values. No scoring function builds an `n x n` matrix: scores come from a few query rows.

Two per-layer options change what a layer attends with: `window` (sliding-window attention: a query at
position p sees keys at positions p - window + 1 ... p) and `softcap` (Gemma 2's attention-logit soft-capping,
`cap * tanh(logits / cap)` before the softmax). Without them the fast paths stay: no mask at all where
every key is visible (a decode step on a global layer), and the fused kernel of `scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .collectives import heads_max, heads_mean

# Prefill with a window or a soft-cap runs in blocks of queries: at most this many logits per block.
BLOCK_LOGITS = 1 << 24


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    pos: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal self-attention of rows sorted by position (prefill, also after compaction).

    `pos` (the rows' original positions, sorted) is needed only with a `window`: rows may be any subset
    of the prompt, so the window is measured in positions, not rows. A windowed layer whose rows all fit
    in its window, and a layer without soft-capping, take the fused causal kernel.
    """
    n = q.shape[1]
    if window is not None and pos is None:
        raise ValueError("causal_attention with a window needs the rows' positions (pos)")
    windowed = window is not None and int(pos[-1] - pos[0]) >= window
    if softcap is None and not windowed:
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=True)
        return out[0]
    if pos is None:
        pos = torch.arange(n, device=q.device)
    # A block of `window` queries sees at most 2 * window keys: twice the logits the window needs, few blocks.
    span = min(n, 2 * window) if windowed else n
    rows = max(1, min(window if windowed else n, BLOCK_LOGITS // (q.shape[0] * span)))
    blocks, options = [], {"window": window, "softcap": softcap}
    for start in range(0, n, rows):
        end = min(n, start + rows)
        first = int(torch.searchsorted(pos, pos[start] - window, right=True)) if windowed else 0
        queries, keys = slice(start, end), slice(first, end)
        blocks.append(attend(q[:, queries], pos[queries], k[:, keys], v[:, keys], pos[keys], scale, **options))
    return torch.cat(blocks, 1)


def visibility_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    hidden: torch.Tensor | None = None,
    window: int | None = None,
    newest: bool = False,
) -> torch.Tensor | None:
    """Bool `[m, t]`: key j is visible to query i (not newer, within `window`, not `hidden`); None when all are.

    `newest`: the caller knows no key is newer than the last query (a decode step), so a single query needs
    no causal mask, and no device sync is spent to find that out. A `window` always gets its mask, for the
    same reason: finding out that every key lies within it would cost a sync (a decode layer spends none).
    """
    mask = None
    if q_pos.shape[0] > 1 or not newest:
        mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        near = k_pos[None, :] > q_pos[:, None] - window
        mask = near if mask is None else mask & near
    if hidden is not None:
        mask = ~hidden[None, :] if mask is None else mask & ~hidden[None, :]
    return mask


def attend(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    hidden: torch.Tensor | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    newest: bool = False,
) -> torch.Tensor:
    """Queries at positions `q_pos` attend to keys at `k_pos`, each seeing only keys with position <= its own
    (and > its own - `window` on a windowed layer) and none of the keys marked `hidden` (bool `[t]`, optional).

    Keys need not be sorted (revived tokens are appended after newer ones). In a decode step (`newest`:
    no key is newer than the last query) a single query on a full-attention layer builds no mask.
    """
    mask = visibility_mask(q_pos, k_pos, hidden, window, newest)
    if softcap is not None or (mask is None and _one_long_query_on_cpu(q, k)):
        return explicit_attention(q, k, v, scale, mask, softcap)
    if mask is not None:
        mask = mask[None, None]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]


def attend_slots(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    lengths: torch.Tensor | None,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One decode query per sequence, `[b, heads, head_dim]` at positions `q_pos` `[b]`, each over its own
    slot of a batch pool: keys/values `[b, kv_heads, t, head_dim]` at `k_pos` `[b, t]`, of which the first
    `lengths[i]` are sequence i's (every one of them visible but for a `window`); `[b, heads, head_dim]`.
    `lengths=None`: every slot holds `t` entries (no mask, the fused kernel's fast path).

    One call for the whole batch. The entries past a slot's length are masked: they must be finite (a pool
    starts zeroed), since a masked value still meets a zero probability."""
    visible = None if lengths is None else torch.arange(k.shape[2], device=k.device)[None, :] < lengths[:, None]
    if window is not None:
        near = k_pos > q_pos[:, None] - window
        visible = near if visible is None else visible & near
    if softcap is not None:
        mask = None if visible is None else visible[:, None, :]
        return explicit_attention(q[:, :, None], k, v, scale, mask, softcap)[:, :, 0]
    mask = None if visible is None else visible[:, None, None]
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[:, :, 0]


# A single fp32 query on CPU over at least this many keys, none masked: two matmuls beat the fused kernel.
EXPLICIT_MIN_KEYS = 2048


def _one_long_query_on_cpu(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[1] == 1 and k.shape[1] >= EXPLICIT_MIN_KEYS and q.device.type == "cpu" and q.dtype == torch.float32


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention as two matmuls and a softmax, with Gemma 2's soft-capped logits when `softcap` is given
    (the fused kernel has no soft-cap): logits in the inputs' dtype, capped, masked, softmax in fp32.
    Leading batch dimensions may come first (`[b, heads, m, d]`, keys `[b, kv_heads, t, d]`, mask `[b, m, t]`:
    `attend_slots`).

    `attend` also takes it for one fp32 query on CPU over `EXPLICIT_MIN_KEYS` keys or more with no mask (a
    decode step on a global layer at a long context): the fused CPU kernel is built for blocks of queries,
    and for a single one over the strided keys of a cache it was slower from about 2K keys on (alone:
    cpu-decode's 4 query heads over 1 KV head, 446 vs 782 us at 8K; SmolLM2's 9 over 3, 1.6 vs 2.8 ms).
    In a whole decode step, where the other layers' work shares the memory bandwidth, the gain is small:
    3% of dense's step on cpu-decode at 8K, 5% on SmolLM2 at 4K (alternating rounds in one process). Below
    2K keys, and with a mask, the two were even or the fused kernel won, so those stay with it.
    `mask`: bool `[m, t]` (or `[b, m, t]`) or None.
    """
    *lead, heads, m, d = q.shape
    kv_heads, t = k.shape[-3], k.shape[-2]
    logits = q.reshape(*lead, kv_heads, heads // kv_heads * m, d) @ k.transpose(-1, -2) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        hidden = ~mask.reshape(*mask.shape[:-2], 1, 1, m, t)  # over each KV head's group of query heads
        logits = logits.view(*lead, kv_heads, -1, m, t).masked_fill(hidden, float("-inf")).view(*lead, kv_heads, -1, t)
    probs = logits.softmax(-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v).reshape(*lead, heads, m, v.shape[-1])


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
    return heads_mean(logits.softmax(-1).mean(0)[0])


def max_head_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """OmniKV's "last" selector: pre-softmax logit of one query `[heads, d]` per key, max over heads."""
    return heads_max(grouped_logits(q[:, None], k, scale).amax(0)[0])


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
