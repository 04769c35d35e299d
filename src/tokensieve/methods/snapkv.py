"""SnapKV (Li et al., "SnapKV: LLM Knows What You Are Looking for Before Generation", NeurIPS 2024).

The attention that the last few prompt tokens (the *observation window*, typically the question at the end
of the prompt) pay to the rest of the prompt predicts which prompt tokens generation will attend to. So,
once the prompt is prefilled, each layer scores every prompt token by the attention it receives from the
window's queries, smooths the scores with a 1-D pooling so that neighbours of an important token come
along (keeps the context of a fact, not just a fragment), and keeps the top-scoring tokens per KV head
plus the window itself. The rest is evicted for good: a token-*dropping* baseline, in contrast to OmniKV,
which keeps every token and re-selects at every step. Generated tokens are never evicted.

Per-head selection: different KV heads keep different tokens, while a layer's cache has one position
vector shared by its heads. The kept keys are gathered per head into `[kv_heads, budget, head_dim]`, and
slot `s` records the largest original position any head keeps there. That placeholder is exact for what
positions are used for: RoPE was applied to the keys in prefill, and every kept key is a prompt key, older
than every decode query, so the position mask of decode attention never hides one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..attention import attention_received
from .base import LayerStep, Method, Policy, Run, require_int, resolve_budget

POOLINGS = ("max", "avg")


@dataclass
class SnapKV(Method):
    """Keep, at every layer and KV head, the `budget` prompt tokens the observation window attends to most.

    `budget`: prompt tokens kept per layer and KV head, the window included: a token count, or a float in
    (0, 1] for a fraction of the prompt. The default 2048 equals OmniKV's default budget, so the two compare
    at equal budgets out of the box (the paper evaluates 1024 to 4096). A prompt within budget is kept whole.
    `window`: the last prompt tokens whose queries score the rest; always kept (paper: 32).
    `kernel`: width of the pooling along tokens, odd (paper: 7). `pooling`: "max" (a peak brings its whole
    neighbourhood along) or "avg" (the authors' released code defaults to avg, with kernel 5).
    """

    name: ClassVar[str] = "snapkv"

    budget: int | float = 2048
    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self):
        resolve_budget(self.budget, 1, "budget")  # type and sign, with clear messages
        require_int(self.window, "window", 1, " (the paper uses 32)")
        if isinstance(self.budget, int) and self.budget <= self.window:
            raise ValueError(
                f"budget {self.budget} must exceed the observation window {self.window}, which it includes: "
                "raise the budget or shrink the window"
            )
        if require_int(self.kernel, "kernel", 1, " and odd (the paper uses 7)") % 2 == 0:
            raise ValueError(f"kernel must be an int >= 1 and odd (the paper uses 7), got {self.kernel!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")

    kv_layout: ClassVar[str] = "per_head"

    def as_decode_side(self) -> Method:
        raise ValueError(
            "SnapKV evicts once, right after prefill, and then decodes densely: put it on the prefill side "
            "(e.g. 'snapkv+streaming_llm')"
        )

    @classmethod
    def keep_all(cls) -> SnapKV:
        return cls(budget=1.0)

    def start(self, run: Run) -> Policy:
        return SnapKVPolicy(self, run)


def observation_scores(
    q_window: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention `[kv_heads, t]` each key receives from the window's queries `[heads, w, d]` (causal by
    position), summed over the window's queries, then averaged over the query heads that share a KV head."""
    received = attention_received(q_window, q_pos, k, k_pos, scale)
    return received.reshape(k.shape[0], -1, received.shape[-1]).mean(1)


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """Scores `[kv_heads, t]` smoothed along tokens by a stride-1 pooling of width `kernel` (same length)."""
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    return pool(scores, kernel_size=kernel, stride=1, padding=kernel // 2)


class SnapKVPolicy(Policy):
    def __init__(self, method: SnapKV, run: Run):
        super().__init__(run)
        self.method = method
        self.budget = resolve_budget(method.budget, run.prompt_len)
        if self.budget < run.prompt_len and self.budget <= method.window:
            raise ValueError(
                f"budget {method.budget} of a {run.prompt_len}-token prompt is {self.budget} tokens, not more than "
                f"the observation window {method.window} it includes: raise the budget or shrink the window"
            )
        layers = run.spec.num_layers
        self.kept = [0] * layers
        self.distinct_kept = [0] * layers
        self.evicted = [0] * layers
        self.selection: torch.Tensor | None = None  # `[kv_heads, budget]` slots of the layer being prefilled

    def prefill_observe(self, step: LayerStep) -> None:
        """Score what the layer keeps while its queries are at hand; `prefill_layer_done` evicts the rest."""
        rows, q, k = step.rows, step.q, step.k
        self.selection = None
        if len(rows) <= self.budget:
            return
        w = self.method.window
        scores = observation_scores(q[:, -w:], rows.pos[-w:], k, rows.pos, self.run.scale)
        pooled = pool_scores(scores[:, :-w], self.method.kernel, self.method.pooling)
        top = pooled.topk(self.budget - w, dim=-1).indices.sort(-1).values
        window = torch.arange(len(rows) - w, len(rows), device=top.device).expand(top.shape[0], -1)
        self.selection = torch.cat([top, window], dim=-1)

    def prefill_layer_done(self, step: LayerStep) -> None:
        layer, kv = step.layer, step.kv
        if self.selection is None:
            self.kept[layer] = self.distinct_kept[layer] = len(kv)
            return
        slots, self.selection = self.selection, None
        self.evicted[layer] = len(kv) - slots.shape[1]
        self.kept[layer] = slots.shape[1]
        self.distinct_kept[layer] = int(slots.unique().numel())
        kv.keep(slots)  # per head; each slot's position is a shared placeholder: see the module docstring

    def stats(self) -> dict[str, Any]:
        return {
            "budget_tokens": self.budget,
            "kept_per_kv_head_per_layer": self.kept,
            "evicted_per_kv_head_per_layer": self.evicted,
            "distinct_kept_per_layer": self.distinct_kept,
        }
