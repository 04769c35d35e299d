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

On the decode side of a composition (`"dense+lazyllm"`, `"sliminfer+lazyllm"`; `LazyLLM.as_decode_side`)
LazyLLM prunes nothing in prefill and keeps no aux cache: another method's prefill did not keep the hidden
states of the tokens it pruned, so nothing can be revived. At each boundary of each decode step it selects
its budget among the prompt tokens that the next stage's layers hold, by original position, and each layer
attends to the selected tokens it holds. That is the same reselection as LazyLLM's own, with a revival
budget of 0 (`revive_per_step=0`). After SlimInfer's prefill the layers of one stage may hold different
tokens (SlimInfer prunes at its own layers), so each layer's context is taken by position from its own KV.

A decode step costs at most one device sync per boundary (the counts of revived, continuing and left-out
tokens, read at once); no other layer syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any, ClassVar

import torch

from ..attention import last_query_probs
from .base import Context, LayerStep, Method, Policy, Rows, Run, require_int, resolve_budget, scaled_layers
from .lazyllm_aux import AuxCache

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
      Default 0: each stage keeps its prefill set, so decode is static pruning (no aux cache, no per-step
      scoring) and a step costs less than dense's. Each revived token is an extra row through its stage:
      1 made SmolLM2's decode 1.29x slower than dense at 2K, None (the paper: every selected token) up to
      17x at 8K, for no measured accuracy gain there. Nothing to bound with `revive=False` or
      `dynamic_decode=False`.
    - `prune_prefill`: False prunes nothing in prefill (and keeps no aux cache); decode still selects each
      stage's budget at every step among the tokens the layers hold. This is LazyLLM on the decode side of
      a composition (`as_decode_side`).
    """

    name: ClassVar[str] = "lazyllm"
    prune_layers: tuple[int, ...] | None = None
    budgets: tuple[int | float, ...] = (0.7, 0.5, 0.3)
    dynamic_decode: bool = True
    revive: bool = True
    revive_per_step: int | None = 0
    prune_prefill: bool = True

    # its selection is by position, shared by every KV head: it cannot follow a per-head eviction (SnapKV)
    needs_shared_kv: ClassVar[bool] = True

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

    def as_decode_side(self) -> LazyLLM:
        """Dynamic reselection over what another prefill left: no prefill pruning, nothing to revive from."""
        if not (self.dynamic_decode and self.revive):
            raise ValueError(
                "LazyLLM with dynamic_decode=False or revive=False decodes over every key prefill left, i.e. "
                "densely: on the decode side use 'dense', or LazyLLM's dynamic reselection (the defaults)"
            )
        return replace(self, prune_prefill=False, revive_per_step=0)

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


def _mask_of(index: torch.Tensor, size: int) -> torch.Tensor:
    """Bool `[size]`, True at `index`."""
    return torch.zeros(size, dtype=torch.bool, device=index.device).index_fill_(0, index, True)


class LazyLLMPolicy(Policy):
    """One generation's state: the boundaries, which prompt tokens each layer holds, the aux caches.

    Layers are grouped into *layouts*: consecutive layers of a stage whose KV holds the same entries in the
    same order (after LazyLLM's own prefill, every layer of a stage; after SlimInfer's, the layers between
    two of its pruning layers). Decode adds the same rows to every layer of a layout, so a layout's context
    is worked out once per step, at its first layer.
    """

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
        self.prunes = method.prune_prefill
        self.revive_limit = method.revive_per_step  # None: every selected token (the paper)
        # After its own prefill each stage holds exactly its budget, so without revival a reselection would
        # pick those same tokens at every step: decode statically and skip the scoring.
        reselection_is_a_no_op = self.prunes and self.revive_limit == 0
        self.dynamic = method.dynamic_decode and method.revive and not reselection_is_a_no_op
        self.revives = self.prunes and self.dynamic and self.revive_limit != 0
        stage_starts = [0, *(b + 1 for b in self.bounds)]
        self.stage_of = [sum(layer > b for b in self.bounds) for layer in range(layers)]
        self.stage_start = set(stage_starts[1:])
        # layouts (see the class docstring), found in prefill: held[g, p] says layout g holds prompt token p
        self.layout_of: list[int] = []
        self.held: list[torch.Tensor] = []
        self.layouts_of_stage: list[list[int]] = [[] for _ in stage_starts]
        self._previous_positions: torch.Tensor | None = None
        self.aux = [AuxCache(prompt_len, device) for _ in self.bounds] if self.revives else []
        # decode: the positions each stage attends to in this step (generated tokens and later turns always);
        # grown in `decode_step_start` as the session goes on
        self.attend = torch.ones(prompt_len, dtype=torch.bool, device=device)
        self.left_out: dict[int, int] = {}  # layout -> its prompt entries this step's selection leaves out
        self.contexts: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}  # layout -> (index, hidden)
        self.revived_rows: Rows | None = None
        # counted on the device, read by `stats`
        self.selected = torch.zeros(len(self.bounds), dtype=torch.long, device=device)
        self.deferred = torch.zeros((), dtype=torch.long, device=device)
        self.steps = 0

    # -- prefill ---------------------------------------------------------------------------------------
    def prefill_keep_after_layer(self, step: LayerStep) -> torch.Tensor | None:
        layer, rows, q, k = step.layer, step.rows, step.q, step.k
        if not self.prunes or layer not in self.bounds:
            return None
        boundary = self.bounds.index(layer)
        keep = self.keep[boundary]
        if keep >= len(rows):
            return None
        scores = last_query_probs(q[:, -1], k, self.run.scale)
        scores[-1] = float("inf")  # the last token produces the first output token
        index = scores.topk(keep).indices.sort().values
        if self.revives:
            dropped = torch.ones(len(rows), dtype=torch.bool, device=rows.pos.device)
            dropped[index] = False
            self.aux[boundary].put(rows.h[dropped], rows.pos[dropped])
        return index

    def prefill_layer_done(self, step: LayerStep) -> None:
        """Record which prompt tokens the layer holds, by position: whatever prefill (this one or another
        method's, in a composition) left there."""
        layer, positions = step.layer, step.kv.positions
        stage = self.stage_of[layer]
        previous = self._previous_positions
        if previous is not None and self.stage_of[layer - 1] == stage and torch.equal(previous, positions):
            layout = self.layout_of[-1]
        else:
            layout = len(self.held)
            self.held.append(_mask_of(positions, self.run.prompt_len))
            self.layouts_of_stage[stage].append(layout)
        self.layout_of.append(layout)
        self._previous_positions = positions if layer + 1 < len(self.stage_of) else None

    # -- decode ----------------------------------------------------------------------------------------
    def decode_step_start(self, position: int) -> None:
        if position >= len(self.attend):
            more = max(position + 1 - len(self.attend), len(self.attend) // 8, 16)
            self.attend = torch.cat([self.attend, self.attend.new_ones(more)])
        self.contexts.clear()

    def decode_rows(self, layer: int, rows: Rows) -> Rows:
        if layer in self.stage_start and self.revived_rows is not None:
            rows = Rows.cat([self.revived_rows, rows])
            self.revived_rows = None
        if len(rows) > 1:  # revived prompt tokens: they get KV at this layer
            self.held[self.layout_of[layer]][rows.pos[:-1]] = True
        return rows

    def decode_context(self, step: LayerStep) -> Context:
        layer, kv = step.layer, step.kv
        if not self.dynamic or self.stage_of[layer] == 0:
            return Context.of(kv)
        layout = self.layout_of[layer]
        left_out = self.left_out[layout]  # known since the boundary before this stage
        if left_out == 0:
            return Context.of(kv)
        if layout not in self.contexts:  # the layout's first layer in this step: by position, in slot order
            shown = self.attend[kv.positions]
            # Masking reads every cached key; copying the selected ones reads them twice and writes them once.
            if left_out <= len(kv) // 2:
                self.contexts[layout] = (None, ~shown)
            else:
                self.contexts[layout] = (torch.nonzero_static(shown, size=len(kv) - left_out).squeeze(1), None)
        index, hidden = self.contexts[layout]
        if hidden is not None:
            return Context(kv.keys, kv.values, kv.positions, hidden, left_out)
        return Context.of(kv, index)

    def decode_layer_done(self, step: LayerStep, context: Context) -> Rows:
        """At a boundary: select the next stage's prompt tokens among those this layer attended (by position),
        count what each layout of the next stage leaves out, and revive what the next stage lacks.

        Everything is worked out on the device over the whole context (masks, not compacted candidates);
        the host reads the few counts it needs (revivals, rows that continue, keys left out) at once: one
        device sync per boundary and step, none at other layers.
        """
        layer, rows, q = step.layer, step.rows, step.q
        if not self.dynamic or layer not in self.bounds:
            return rows
        boundary = self.bounds.index(layer)
        prompt_len = self.run.prompt_len
        candidates = context.pos < prompt_len
        if context.hidden is not None:
            candidates &= ~context.hidden
        scores = last_query_probs(q[:, -1], context.k, self.run.scale, context.hidden)
        in_flight = rows.pos[:-1]  # tokens revived earlier in this step; the new token is the last row
        has_kv = self._stage_holds(boundary + 1)[context.pos.clamp(max=prompt_len - 1)] & candidates
        if len(in_flight):
            has_kv |= torch.isin(context.pos, in_flight)
        picked = self._select(boundary, scores, candidates, has_kv)
        self.attend[:prompt_len] = False
        self.attend[context.pos] = picked | (context.pos >= prompt_len)
        self.selected[boundary] += picked.sum()

        layouts = self.layouts_of_stage[boundary + 1]
        counts = [(self.held[g] & ~self.attend[:prompt_len]).sum() for g in layouts]
        if not self.revives:
            self.left_out.update(zip(layouts, torch.stack(counts).tolist(), strict=True))
            return rows
        revive = picked & ~has_kv  # selected, with no KV in the next stage and not already a row
        continues = self.attend[in_flight]
        lacking = self.aux[boundary].lacks(context.pos.clamp(max=prompt_len - 1)) & revive
        revivals, continuing, lacked, *left_out = torch.stack(
            [revive.sum(), continues.sum(), lacking.sum(), *counts]
        ).tolist()
        self.left_out.update(zip(layouts, left_out, strict=True))
        if lacked:
            raise RuntimeError(f"LazyLLM aux cache lacks positions {context.pos[lacking].tolist()} (a bookkeeping bug)")
        order = torch.sort(~continues, stable=True).indices  # the rows that continue first, each part in row order
        self.aux[boundary].put(rows.h[order[continuing:]], in_flight[order[continuing:]])
        if revivals:  # best first, as selected: from the aux cache
            positions = context.pos[scores.masked_fill(~revive, -1.0).topk(revivals).indices]
            self.revived_rows = Rows(self.aux[boundary].take(positions), positions)
        if continuing == len(in_flight):
            return rows
        last = torch.arange(len(rows) - 1, len(rows), device=order.device)
        return rows.select(torch.cat([order[:continuing], last]))

    def _stage_holds(self, stage: int) -> torch.Tensor:
        """Bool `[prompt_len]`: prompt tokens some layer of `stage` holds."""
        held = [self.held[g] for g in self.layouts_of_stage[stage]]
        return held[0] if len(held) == 1 else torch.stack(held).any(0)

    def _select(
        self, boundary: int, scores: torch.Tensor, candidates: torch.Tensor, has_kv: torch.Tensor
    ) -> torch.Tensor:
        """Bool over the context: the stage's budget of best-scoring candidates. Under a revival budget,
        candidates with no KV in the next stage compete only for `revive_per_step` places (the best of them);
        the other places go to the best candidates that have KV, so the stage still attends to its budget of
        tokens where the layers hold enough. Scores are probabilities (>= 0), so a -1 never outranks them."""
        keep = min(self.keep[boundary], len(scores))
        ranked = scores.masked_fill(~candidates, -1.0)
        paper = _mask_of(ranked.topk(keep).indices, len(scores)) & candidates
        if self.revive_limit is None:
            return paper
        allowed = has_kv.clone()
        if self.revive_limit:
            allowed[ranked.masked_fill(has_kv, -1.0).topk(min(self.revive_limit, len(scores))).indices] = True
            allowed &= candidates
        chosen = _mask_of(scores.masked_fill(~allowed, -1.0).topk(keep).indices, len(scores)) & allowed
        self.deferred += (paper & ~chosen).sum()  # what the paper would revive on top
        return chosen

    def decode_step_done(self) -> None:
        self.steps += 1

    # -- accounting ------------------------------------------------------------------------------------
    def device_bytes(self) -> int:
        return sum(aux.nbytes for aux in self.aux)

    def stats(self) -> dict[str, Any]:
        steps = max(1, self.steps)
        stats: dict[str, Any] = {
            "prune_after_layers": list(self.bounds),
            "budget_tokens": self.keep,
            "decode_selection": "dynamic" if self.dynamic else "static",
        }
        if self.prunes and self.held:
            held = torch.stack([h.sum() for h in self.held]).tolist()  # includes tokens revived during decode
            computed = sum(held[layout] for layout in self.layout_of)
            stats["prompt_computed_pct"] = round(100 * computed / (self.run.prompt_len * len(self.layout_of)), 2)
        if self.dynamic:
            stats["selected_per_boundary"] = [round(n / steps, 2) for n in self.selected.tolist()]
            stats["revivals_deferred_per_step"] = round(int(self.deferred) / steps, 2)
        if self.prunes:
            stats["aux_cache_tokens"] = [len(aux) for aux in self.aux]
            stats["aux_cache_bytes"] = self.device_bytes()
        return stats
