"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs", NeurIPS 2023).

A small set of tokens, the *heavy hitters*, receives most of the attention, and the sum of the attention a
token has received so far predicts whether it will matter later. H2O keeps a fixed-size cache of heavy
hitters plus the most recent tokens: after prefill it keeps, per KV head, the tokens with the largest
attention accumulated over all prompt queries; then at every decode step it adds the new token's attention
to the running sums and evicts the lowest-scoring non-recent entry. Evicted tokens are gone for good: a
token-*dropping* baseline, in contrast to OmniKV.

Scores are per KV head (the attention of its query heads, summed), so heads keep different tokens; the
kept entries are gathered per head and the cache's one position vector holds, per slot, the largest
position any head keeps there, which hides nothing from a decode query (see `snapkv.py`). The prompt's
accumulated attention is computed in chunks of queries, never as one `N x N` matrix; the decode scores
re-read the attended keys once more per step (H2O's price for knowing its attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..attention import grouped_logits
from ..cache import LayerKV
from .base import Context, Method, Policy, Rows, Run, resolve_budget

# Query rows scored at once in prefill: at most this many rows, and about this many fp32 logits.
SCORE_CHUNK_ROWS = 256
SCORE_CHUNK_ELEMENTS = 1 << 24


@dataclass
class H2O(Method):
    """Keep `budget` entries per layer and KV head: heavy hitters by accumulated attention, plus recent ones.

    `budget`: cache entries per layer and KV head, at all times after prefill: an int, or a float in (0, 1]
    for a fraction of the prompt. The default 2048 matches OmniKV's default budget. `None` never evicts
    (the dense model: `keep_all`).
    `recent_ratio`: the share of the budget for the most recent tokens, the rest for heavy hitters; the
    paper splits its cache equally (0.5). At least one recent entry is kept (the newest token).
    """

    name: ClassVar[str] = "h2o"

    budget: int | float | None = 2048
    recent_ratio: float = 0.5

    def __post_init__(self):
        if self.budget is not None:
            resolve_budget(self.budget, 1, "budget")  # type and sign, with clear messages
        if isinstance(self.recent_ratio, bool) or not isinstance(self.recent_ratio, (int, float)):
            raise TypeError(f"recent_ratio must be a number in (0, 1], got {self.recent_ratio!r}")
        if not 0 < self.recent_ratio <= 1:
            raise ValueError(f"recent_ratio must be in (0, 1] (the paper uses 0.5), got {self.recent_ratio}")

    @classmethod
    def keep_all(cls) -> H2O:
        return cls(budget=None)

    def start(self, run: Run) -> Policy:
        return H2OPolicy(run, self)


def accumulated_attention(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention `[kv_heads, n]` each of `n` rows received from every row's query (causal), summed over
    queries and over the query heads of each KV head.

    Rows are sorted by position (prefill), so query rows `[a, b)` see only key rows `[0, b)`: chunks of
    query rows score only those (about half the work of the full square) and never hold `n x n` logits.
    """
    heads, n, _ = q.shape
    kv_heads = k.shape[0]
    total = torch.zeros(kv_heads, n, dtype=torch.float32, device=k.device)
    chunk = max(1, min(SCORE_CHUNK_ROWS, SCORE_CHUNK_ELEMENTS // (heads * n)))
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        logits = grouped_logits(q[:, start:end], k[:, :end], scale)
        logits.masked_fill_(pos[None, None, :end] > pos[None, start:end, None], float("-inf"))
        received = logits.softmax(-1).sum(1)
        total[:, :end] += received.reshape(kv_heads, -1, end).sum(1)
    return total


class H2OPolicy(Policy):
    def __init__(self, run: Run, method: H2O):
        super().__init__(run)
        self.budget = None if method.budget is None else _budget_tokens(method.budget, run.prompt_len)
        if self.budget is not None:
            self.recent = min(self.budget, max(1, round(self.budget * method.recent_ratio)))
        layers = run.spec.num_layers
        self.scores: list[torch.Tensor | None] = [None] * layers  # `[kv_heads, t]` accumulated attention
        self.positions: list[torch.Tensor | None] = [None] * layers  # `[kv_heads, t]` true per-head positions
        self.caches: list[LayerKV | None] = [None] * layers
        self.kept_after_prefill = [0] * layers
        self.evicted_in_prefill = [0] * layers
        self.evicted_in_decode = [0] * layers

    def prefill_keep_after_attention(self, layer: int, rows: Rows, q: torch.Tensor, k: torch.Tensor) -> None:
        """Record the attention each prompt token received at this layer; nothing is pruned from the rows."""
        if self.budget is not None:
            self.scores[layer] = accumulated_attention(q, k, rows.pos, self.run.scale)
        return None

    def prefill_layer_done(self, layer: int, kv: LayerKV) -> None:
        self.positions[layer] = kv.positions.clone().expand(kv.keys.shape[0], -1)
        self.evicted_in_prefill[layer] = self._evict(layer, kv)
        self.kept_after_prefill[layer] = len(kv)

    def decode_context(self, layer: int, q: torch.Tensor, rows: Rows, kv: LayerKV) -> Context:
        self.caches[layer] = kv  # evicted from in `decode_layer_done`, once this step's attention is known
        return Context.of(kv)

    def decode_layer_done(self, layer: int, rows: Rows, q: torch.Tensor, context: Context) -> Rows:
        """Add this step's attention to the running sums, then evict down to the budget."""
        if self.budget is None:
            return rows
        kv = self.caches[layer]
        received = grouped_logits(q, context.k, self.run.scale).softmax(-1).sum(1)
        self._add_received(layer, kv, received, rows.pos)
        if len(kv) == self.budget + 1:  # the usual step: one entry over, evicted in place
            self._evict_one(layer, kv)
            self.evicted_in_decode[layer] += 1
        else:
            self.evicted_in_decode[layer] += self._evict(layer, kv)
        self.caches[layer] = None
        return rows

    def extend_layer_done(self, layer: int, rows: Rows, q: torch.Tensor, kv: LayerKV) -> None:
        """A later turn: the attention its rows gave joins the running sums, then the cache is cut to the budget."""
        if self.budget is None:
            return
        received = torch.zeros(q.shape[0], len(kv), device=q.device)
        chunk = max(1, SCORE_CHUNK_ELEMENTS // (q.shape[0] * len(kv)))
        for start in range(0, len(rows), chunk):  # never all m x t logits at once
            logits = grouped_logits(q[:, start : start + chunk], kv.keys, self.run.scale)
            logits.masked_fill_(kv.positions[None, None, :] > rows.pos[None, start : start + chunk, None], -torch.inf)
            received += logits.softmax(-1).sum(1)
        self._add_received(layer, kv, received, rows.pos)
        self.evicted_in_decode[layer] += self._evict(layer, kv)

    def _add_received(self, layer: int, kv: LayerKV, received: torch.Tensor, new_pos: torch.Tensor) -> None:
        """Add the attention every entry received from this step's queries (`received` `[heads, t]`, summed
        over the queries) to its running sum; the step's new entries, the last of `kv`, join with it."""
        new = len(kv) - self.scores[layer].shape[1]
        kv_heads = kv.keys.shape[0]
        received = received.reshape(kv_heads, -1, received.shape[-1]).sum(1)
        self.scores[layer] = torch.cat([self.scores[layer], received.new_zeros(kv_heads, new)], dim=1) + received
        self.positions[layer] = torch.cat([self.positions[layer], new_pos[-new:].expand(kv_heads, -1)], dim=1)

    def _evict_one(self, layer: int, kv: LayerKV) -> None:
        """Per KV head, the lowest-scoring entry older than the recent window makes room for the newest."""
        scores, positions = self.scores[layer], self.positions[layer]
        older = positions <= positions[:, -1:] - self.recent  # the recent window is the newest positions
        slots = scores.masked_fill(~older, float("inf")).argmin(-1)
        heads, last = torch.arange(len(slots), device=slots.device), len(kv) - 1
        scores[heads, slots], positions[heads, slots] = scores[:, last].clone(), positions[:, last].clone()
        self.scores[layer], self.positions[layer] = scores[:, :last], positions[:, :last]
        kv.move_last_to(slots)

    def _evict(self, layer: int, kv: LayerKV) -> int:
        """Keep per KV head the `budget - recent` highest-scoring older entries and the `recent` newest."""
        if self.budget is None or len(kv) <= self.budget:
            return 0
        t, heavy = len(kv), self.budget - self.recent
        scores, positions = self.scores[layer], self.positions[layer]
        top = scores[:, : t - self.recent].topk(heavy, dim=-1).indices.sort(-1).values
        recent = torch.arange(t - self.recent, t, device=top.device).expand(top.shape[0], -1)
        slots = torch.cat([top, recent], dim=-1)
        index = slots[..., None].expand(-1, -1, kv.keys.shape[-1])
        self.scores[layer] = scores.gather(1, slots)
        self.positions[layer] = positions.gather(1, slots)
        positions = self.positions[layer].amax(0)
        kv.replace(kv.keys.gather(1, index), kv.values.gather(1, index), positions)
        return t - self.budget

    def stats(self) -> dict[str, Any]:
        distinct = [0 if p is None else int(p.unique().numel()) for p in self.positions]
        return {
            "budget_tokens": self.budget,
            "recent_tokens": None if self.budget is None else self.recent,
            "kept_after_prefill_per_layer": self.kept_after_prefill,
            "evicted_in_prefill_per_layer": self.evicted_in_prefill,
            "evicted_in_decode_per_layer": self.evicted_in_decode,
            "distinct_kept_per_layer": distinct,
        }


def _budget_tokens(budget: int | float, prompt_len: int) -> int:
    """A count as given (it also bounds decode), a fraction of the prompt rounded."""
    return budget if isinstance(budget, int) else resolve_budget(budget, prompt_len)
