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

from ..attention import attention_received
from ..cache import LayerKV
from .base import Context, LayerStep, Method, Policy, Rows, Run, resolve_budget


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

    kv_layout: ClassVar[str] = "per_head"
    needs_shared_kv: ClassVar[bool] = True  # its running scores cover every entry prefill left, per head

    def as_prefill_side(self) -> Method:
        raise ValueError(
            "H2O's prefill is dense (it evicts KV after prefill and in decode): put it on the decode side, "
            "e.g. 'sliminfer+h2o'"
        )

    @classmethod
    def keep_all(cls) -> H2O:
        return cls(budget=None)

    def start(self, run: Run) -> Policy:
        return H2OPolicy(self, run)


def per_kv_head(received: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Attention received per query head `[heads, t]`, summed over the query heads of each KV head."""
    return received.reshape(kv_heads, -1, received.shape[-1]).sum(1)


class H2OPolicy(Policy):
    def __init__(self, method: H2O, run: Run):
        super().__init__(run)
        self.budget = None if method.budget is None else _budget_tokens(method.budget, run.prompt_len)
        if self.budget is not None:
            self.recent = min(self.budget, max(1, round(self.budget * method.recent_ratio)))
        layers = run.spec.num_layers
        self.scores: list[torch.Tensor | None] = [None] * layers  # `[kv_heads, t]` accumulated attention
        self.positions: list[torch.Tensor | None] = [None] * layers  # `[kv_heads, t]` true per-head positions
        self.kept_after_prefill = [0] * layers
        self.evicted_in_prefill = [0] * layers
        self.evicted_in_decode = [0] * layers

    def prefill_observe(self, step: LayerStep) -> None:
        """Record the attention each prompt token received at this layer."""
        if self.budget is not None:
            received = attention_received(step.q, step.rows.pos, step.k, step.rows.pos, self.run.scale, True)
            self.scores[step.layer] = per_kv_head(received, step.k.shape[0])

    def prefill_layer_done(self, step: LayerStep) -> None:
        layer, kv = step.layer, step.kv
        self.positions[layer] = kv.positions.clone().expand(kv.keys.shape[0], -1)
        self.evicted_in_prefill[layer] = self._evict(layer, kv)
        self.kept_after_prefill[layer] = len(kv)

    def decode_layer_done(self, step: LayerStep, context: Context) -> Rows:
        """Add this step's attention to the running sums, then evict down to the budget."""
        layer, rows, q, kv = step.layer, step.rows, step.q, step.kv
        if self.budget is None:
            return rows
        received = attention_received(q, rows.pos, context.k, context.pos, self.run.scale)
        self._add_received(layer, kv, received, rows.pos)
        if len(kv) == self.budget + 1:  # the usual step: one entry over, evicted in place
            self._evict_one(layer, kv)
            self.evicted_in_decode[layer] += 1
        else:
            self.evicted_in_decode[layer] += self._evict(layer, kv)
        return rows

    def extend_layer_done(self, step: LayerStep) -> None:
        """A later turn: the attention its rows gave joins the running sums, then the cache is cut to the budget."""
        layer, rows, q, kv = step.layer, step.rows, step.q, step.kv
        if self.budget is None:
            return
        received = attention_received(q, rows.pos, kv.keys, kv.positions, self.run.scale)
        self._add_received(layer, kv, received, rows.pos)
        self.evicted_in_decode[layer] += self._evict(layer, kv)

    def _add_received(self, layer: int, kv: LayerKV, received: torch.Tensor, new_pos: torch.Tensor) -> None:
        """Add the attention every entry received from this step's queries (`received` `[heads, t]`, summed
        over the queries) to its running sum; the step's new entries, the last of `kv`, join with it."""
        new = len(kv) - self.scores[layer].shape[1]
        kv_heads = kv.keys.shape[0]
        received = per_kv_head(received, kv_heads)
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
        self.scores[layer] = scores.gather(1, slots)
        self.positions[layer] = positions.gather(1, slots)
        kv.keep(slots, self.positions[layer].amax(0))  # the newest true position any head keeps per slot
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
