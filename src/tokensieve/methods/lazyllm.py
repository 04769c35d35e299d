"""LazyLLM (arXiv 2407.14057): compute only the prompt tokens that matter, progressively, in prefill and decode.

A few boundary layers split the network into stages. At a boundary the last position's attention
probability, averaged over heads, scores the prompt tokens still present; the lowest are pruned and take
no part in any later layer. Decode repeats the selection at every step with the new token's query, over
all prompt tokens: a token selected where it has no KV is *revived* from the hidden state saved when it
was pruned (the aux cache) instead of being recomputed from layer 0, so each token is computed at most
once per layer over the whole generation.

Layer mapping: boundary `b` means "prune after layer b", i.e. the next stage starts at layer `b + 1`.
The paper's four stages for 32 layers are layers 0-8, 9-18, 19-27, 28-31 (boundaries 8, 18, 27); other
depths scale the stage starts 9, 19, 28 (`scaled_layers`) and subtract one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any, ClassVar

import torch

from ..attention import last_query_probs
from .base import Context, LayerStep, Method, Policy, Rows, Run, require_int, resolve_budget, scaled_layers

PAPER_STAGE_STARTS = (9, 19, 28)
PAPER_DEPTH = 32


@dataclass
class LazyLLM(Method):
    """Progressive, dynamic token pruning with an aux cache of pruned hidden states.

    - `prune_layers`: the layers *after which* the prompt is pruned (one per `budgets` entry, increasing,
      each below the last layer). None: the paper's stages scaled by depth (8, 18, 27 for 32 layers).
    - `budgets`: per boundary, the prompt tokens still computed after it, as a fraction of the prompt
      (float in (0, 1]) or a token count (int); non-increasing. The paper illustrates pruning ~30% of the
      remaining tokens at each boundary (0.7, 0.49, 0.34 of the prompt); our default (0.7, 0.5, 0.3) is
      that rounded, and gives an ideal prefill speedup of about 1.7x at 8192 tokens on `cpu-prefill`.
    - `dynamic_decode`: at every decode step, select again among all prompt tokens at each boundary,
      reviving selected tokens that lack KV from the aux cache.
    - `revive`: False is the paper's "static pruning" ablation: prune in prefill only, keep no aux cache,
      and let decode attend to every key that exists. `dynamic_decode=False` decodes the same way.
    - `revive_per_step`: a latency bound on revival, not in the paper: at most this many tokens revived per
      boundary per decode step, the best-scoring first; the stage's other places go to the best tokens that
      already have KV, and what the paper would have revived on top shows as `revivals_deferred_per_step`.
      Default 1, so that a decode step costs no more than dense's; None (the paper) revives every selected
      token (up to 17x dense's time per step at 8K on SmolLM2); 0 keeps each stage's prefill set, i.e. static
      pruning. Nothing to bound with `revive=False` or `dynamic_decode=False`.
    """

    name: ClassVar[str] = "lazyllm"
    prune_layers: tuple[int, ...] | None = None
    budgets: tuple[int | float, ...] = (0.7, 0.5, 0.3)
    dynamic_decode: bool = True
    revive: bool = True
    revive_per_step: int | None = 1

    def __post_init__(self):
        self.budgets = tuple(self.budgets)
        if not self.budgets:
            raise ValueError("budgets is empty: give one fraction or token count per pruning layer")
        for budget in self.budgets:
            resolve_budget(budget, 1, "LazyLLM budget")  # type and sign checks
        same_kind = all(isinstance(b, float) for b in self.budgets) or all(isinstance(b, int) for b in self.budgets)
        if same_kind and not _non_increasing(self.budgets):
            raise ValueError(
                f"budgets {self.budgets} must be non-increasing: token sets are nested, later stages keep fewer"
            )
        if self.prune_layers is not None:
            self.prune_layers = tuple(self.prune_layers)
            if len(self.prune_layers) != len(self.budgets):
                raise ValueError(
                    f"prune_layers {self.prune_layers} and budgets {self.budgets} differ in length: give one budget "
                    "entry per pruning layer"
                )
            if not all(isinstance(b, int) and not isinstance(b, bool) for b in self.prune_layers):
                raise TypeError(f"prune_layers must be layer indices (ints), got {self.prune_layers}")
            if list(self.prune_layers) != sorted(set(self.prune_layers)):
                raise ValueError(f"prune_layers must be strictly increasing, got {self.prune_layers}")
        if self.revive_per_step is not None:
            require_int(self.revive_per_step, "revive_per_step", 0, " (or None: no bound)")

    def as_prefill_side(self) -> LazyLLM:
        """Static pruning (the paper's ablation): prune in prefill, no aux cache; the decode side takes over."""
        return replace(self, dynamic_decode=False, revive=False, revive_per_step=None)

    def as_decode_side(self) -> Method:
        raise ValueError(
            "LazyLLM's decode revives the tokens its own prefill pruned, so it cannot follow another prefill: "
            "use method='lazyllm' alone, or put LazyLLM on the prefill side (e.g. 'lazyllm+omnikv')"
        )

    @classmethod
    def keep_all(cls) -> LazyLLM:
        return cls(budgets=(1.0, 1.0, 1.0))

    def boundaries(self, num_layers: int) -> tuple[int, ...]:
        """The layers after which the prompt is pruned, for a model of `num_layers` layers."""
        if self.prune_layers is None:
            layers = tuple(start - 1 for start in scaled_layers(PAPER_STAGE_STARTS, PAPER_DEPTH, num_layers))
            if len(layers) != len(self.budgets) or layers[0] < 0:
                raise ValueError(
                    f"a {num_layers}-layer model is too shallow for {len(self.budgets)} pruning layers placed by "
                    "depth: pass prune_layers explicitly (and one budget per layer)"
                )
            return layers
        if self.prune_layers[0] < 0 or self.prune_layers[-1] >= num_layers - 1:
            raise ValueError(
                f"prune_layers {self.prune_layers} must lie in [0, {num_layers - 2}] for a {num_layers}-layer "
                "model (pruning after the last layer would save nothing)"
            )
        return self.prune_layers

    def start(self, run: Run) -> LazyLLMPolicy:
        return LazyLLMPolicy(self, run)


def _non_increasing(values) -> bool:
    return all(earlier >= later for earlier, later in pairwise(values))


class AuxCache:
    """Hidden states (outputs of one boundary layer) of the prompt tokens pruned there, by position.

    A token enters a boundary's aux cache at most once (it only leaves by being revived past that
    boundary, after which it has KV there), so entries are appended and taken, never overwritten.
    """

    def __init__(self, prompt_len: int, device: torch.device):
        self.h: torch.Tensor | None = None
        self.pos = torch.empty(0, dtype=torch.long, device=device)
        self.slot = torch.full((prompt_len,), -1, dtype=torch.long, device=device)
        self.live = 0

    def __len__(self) -> int:
        return self.live

    def put(self, h: torch.Tensor, pos: torch.Tensor) -> None:
        if len(pos) == 0:
            return
        self.slot[pos] = torch.arange(len(self.pos), len(self.pos) + len(pos), device=pos.device)
        self.h = h.clone() if self.h is None else torch.cat([self.h, h])
        self.pos = torch.cat([self.pos, pos])
        self.live += len(pos)

    def take(self, pos: torch.Tensor) -> torch.Tensor:
        """The hidden states of `pos`, which leave the cache."""
        slots = self.slot[pos]
        if bool((slots < 0).any()):
            raise RuntimeError(f"LazyLLM aux cache lacks positions {pos[slots < 0].tolist()} (a bookkeeping bug)")
        h = self.h[slots]
        self.slot[pos] = -1
        self.live -= len(pos)
        if 2 * self.live < len(self.pos):  # drop the holes once they are the majority
            alive = self.slot[self.pos] >= 0
            self.h, self.pos = self.h[alive], self.pos[alive]
            self.slot[self.pos] = torch.arange(len(self.pos), device=self.pos.device)
        return h

    @property
    def nbytes(self) -> int:
        return 0 if self.h is None else self.h.numel() * self.h.element_size()


class LazyLLMPolicy(Policy):
    """One generation's state: the boundaries, which prompt tokens have KV in each stage, the aux caches."""

    def __init__(self, method: LazyLLM, run: Run):
        super().__init__(run)
        layers, prompt_len, device = run.spec.num_layers, run.prompt_len, run.device
        self.bounds = method.boundaries(layers)
        self.keep = [resolve_budget(b, prompt_len, "LazyLLM budget") for b in method.budgets]
        if not _non_increasing(self.keep):
            raise ValueError(
                f"budgets {method.budgets} resolve to {self.keep} tokens for a {prompt_len}-token prompt, which "
                "increases: give a non-increasing schedule"
            )
        self.dynamic = method.dynamic_decode and method.revive
        stage_starts = [0, *(b + 1 for b in self.bounds)]
        self.stage_of = [sum(layer > b for b in self.bounds) for layer in range(layers)]
        self.stage_len = [end - start for start, end in pairwise([*stage_starts, layers])]
        self.stage_start = set(stage_starts[1:])
        # present[s, p]: prompt token p has KV in the layers of stage s (sets are nested across stages)
        self.present = torch.zeros(len(stage_starts), prompt_len, dtype=torch.bool, device=device)
        self.present[0] = True
        self.aux = [AuxCache(prompt_len, device) for _ in self.bounds] if self.dynamic else []
        # decode: the positions each stage attends to in this step (generated tokens and later turns always);
        # grown in `decode_step_start` as the session goes on
        self.attend = torch.ones(prompt_len, dtype=torch.bool, device=device)
        self.revived_rows: Rows | None = None
        self.context_index: torch.Tensor | None = None  # the stage's selected entries, copied out ...
        self.context_hidden: torch.Tensor | None = None  # ... or masked, when only a few are left out
        self.context_left_out = 0
        self.revive_limit = method.revive_per_step  # None: every selected token (the paper)
        self.deferred = 0
        self.steps = 0

    # -- prefill ---------------------------------------------------------------------------------------
    def prefill_keep_after_layer(self, step: LayerStep) -> torch.Tensor | None:
        layer, rows, q, k = step.layer, step.rows, step.q, step.k
        if layer not in self.bounds:
            return None
        boundary = self.bounds.index(layer)
        keep = self.keep[boundary]
        if keep >= len(rows):
            self.present[boundary + 1, rows.pos] = True
            return None
        scores = last_query_probs(q[:, -1], k, self.run.scale)
        scores[-1] = float("inf")  # the last token produces the first output token
        index = scores.topk(keep).indices.sort().values
        self.present[boundary + 1, rows.pos[index]] = True
        if self.dynamic:
            dropped = torch.ones(len(rows), dtype=torch.bool, device=rows.pos.device)
            dropped[index] = False
            self.aux[boundary].put(rows.h[dropped], rows.pos[dropped])
        return index

    # -- decode ----------------------------------------------------------------------------------------
    def decode_step_start(self, position: int) -> None:
        if position >= len(self.attend):
            more = max(position + 1 - len(self.attend), len(self.attend) // 8, 16)
            self.attend = torch.cat([self.attend, self.attend.new_ones(more)])

    def decode_rows(self, layer: int, rows: Rows) -> Rows:
        if layer in self.stage_start and self.revived_rows is not None:
            rows = Rows.cat([self.revived_rows, rows])
            self.revived_rows = None
        if len(rows) > 1:
            self.present[self.stage_of[layer], rows.pos[:-1]] = True
        return rows

    def decode_context(self, step: LayerStep) -> Context:
        layer, kv = step.layer, step.kv
        if not self.dynamic or self.stage_of[layer] == 0:
            return Context.of(kv)
        if layer in self.stage_start:  # every layer of a stage holds the same entries in the same order
            selected = self.attend[kv.positions]
            left_out = len(selected) - int(selected.sum())
            # Masking reads every cached key; copying the selected ones reads them twice and writes them once.
            self.context_hidden = ~selected if 0 < left_out <= len(selected) // 2 else None
            self.context_index = selected.nonzero().squeeze(1) if left_out > len(selected) // 2 else None
            self.context_left_out = left_out
        if self.context_hidden is not None:
            return Context(kv.keys, kv.values, kv.positions, self.context_hidden, self.context_left_out)
        return Context.of(kv, self.context_index)

    def decode_layer_done(self, step: LayerStep, context: Context) -> Rows:
        layer, rows, q = step.layer, step.rows, step.q
        if not self.dynamic or layer not in self.bounds:
            return rows
        boundary = self.bounds.index(layer)
        prompt_len = self.run.prompt_len
        candidates = context.pos < prompt_len
        if context.hidden is not None:
            candidates &= ~context.hidden
        scores = last_query_probs(q[:, -1], context.k, self.run.scale, context.hidden)[candidates]
        positions = context.pos[candidates]
        in_flight = rows.pos[:-1]  # tokens revived earlier in this step; the new token is the last row
        has_kv = self.present[boundary + 1, positions] | torch.isin(positions, in_flight)
        chosen = self._select(boundary, scores, has_kv)
        selected = positions[chosen]
        self.attend[:prompt_len] = False
        self.attend[selected] = True

        continues = self.attend[in_flight]
        self.aux[boundary].put(rows.h[:-1][~continues], in_flight[~continues])
        revive = selected[~has_kv[chosen]]
        if len(revive):  # selected, with no KV in the next stage and not already a row: from the aux cache
            self.revived_rows = Rows(self.aux[boundary].take(revive), revive)
        if bool(continues.all()):
            return rows
        last = torch.tensor([len(rows) - 1], device=continues.device)
        return rows.select(torch.cat([continues.nonzero().squeeze(1), last]))

    def _select(self, boundary: int, scores: torch.Tensor, has_kv: torch.Tensor) -> torch.Tensor:
        """Indices of the stage's budget of best-scoring candidates. Under a revival budget, candidates with no
        KV in the next stage compete only for `revive_per_step` places (the best of them); the other places
        go to the best candidates that have KV, so the stage still attends to its budget of tokens."""
        keep = min(self.keep[boundary], len(scores))
        paper = scores.topk(keep).indices
        missing = int((~has_kv).sum())
        if self.revive_limit is None or missing <= self.revive_limit:
            return paper
        allowed = has_kv.clone()
        allowed[scores.masked_fill(has_kv, -1.0).topk(self.revive_limit).indices] = True
        chosen = scores.masked_fill(~allowed, -1.0).topk(min(keep, int(allowed.sum()))).indices
        self.deferred += int((~torch.isin(paper, chosen)).sum())  # what the paper would revive on top
        return chosen

    def decode_step_done(self) -> None:
        self.steps += 1

    # -- accounting ------------------------------------------------------------------------------------
    def device_bytes(self) -> int:
        return sum(aux.nbytes for aux in self.aux)

    def stats(self) -> dict[str, Any]:
        prompt_len, layers = self.run.prompt_len, self.run.spec.num_layers
        stage_tokens = self.present.sum(1).tolist()  # includes tokens revived during decode
        computed = sum(n * length for n, length in zip(stage_tokens, self.stage_len, strict=True))
        steps = max(1, self.steps)
        return {
            "prune_after_layers": list(self.bounds),
            "budget_tokens": self.keep,
            "decode_selection": "dynamic" if self.dynamic else "static",
            "prompt_computed_pct": round(100 * computed / (prompt_len * layers), 2),
            "revivals_deferred_per_step": round(self.deferred / steps, 2),
            "aux_cache_tokens": [len(aux) for aux in self.aux],
            "aux_cache_bytes": self.device_bytes(),
        }
