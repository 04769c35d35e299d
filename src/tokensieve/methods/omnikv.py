"""OmniKV (ICLR 2025): token-dropping-free dynamic context selection in decode.

Within one decode step the tokens that draw attention are largely the same across layers, so a few
*filter* layers choose, from the current token's query, the prompt tokens that the following *sparse*
layers attend to. Nothing is dropped: an unselected token can be selected at the next step, and with
`offload=True` the sparse layers' prompt KV waits in host memory, from where a filter layer's choice is
brought back in one packed copy per segment while the *wait* layer after the filter layer computes.

Layers (0-based), for filter layers F and `wait_layers` w:
- dense: every layer before min(F), each filter layer, and the w layers after each filter layer;
- sparse: every other layer; it belongs to the segment of the last filter layer before it and attends to
  that filter layer's selected prompt tokens plus every generated token (its device "tail").
With F = (2, 8, 18), w = 1 on 32 layers: dense = {0, 1, 2, 3, 8, 9, 18, 19}, the other 24 are sparse.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import torch

from ..attention import grouped_logits, max_head_logits
from ..cache import Kind, LayerKV, find_sorted
from ..collectives import heads_max
from ..model import ModelSpec
from ..offload import Pending
from .base import Context, LayerStep, Method, Policy, Run, require_int, resolve_budget, scaled_layers
from .omnikv_store import PackedSegment

PAPER_FILTER_LAYERS = (2, 8, 18)  # Llama-3-8B, 32 layers
PAPER_DEPTH = 32
SELECTORS = ("last", "softmax_last", "uniform", "exp")
WINDOWED = ("uniform", "exp")


@dataclass(frozen=True)
class LayerPlan:
    """Which layers are filter, dense and sparse, and which sparse layers each filter layer serves."""

    num_layers: int
    filter_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    segments: dict[int, tuple[int, ...]]  # filter layer -> the sparse layers using its selection

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(layer for layers in self.segments.values() for layer in layers)

    def segment_of(self, layer: int) -> int | None:
        """The filter layer whose selection sparse layer `layer` uses; None for a dense layer."""
        for filter_layer, layers in self.segments.items():
            if layer in layers:
                return filter_layer
        return None


def plan_layers(filter_layers: tuple[int, ...], wait_layers: int, num_layers: int) -> LayerPlan:
    """Classify the layers of a `num_layers`-deep model (see the module docstring)."""
    filters = tuple(sorted(set(filter_layers)))
    if not filters or filters[0] < 0 or filters[-1] >= num_layers:
        raise ValueError(f"filter layers {filter_layers} must be non-empty and within 0..{num_layers - 1}")
    dense = set(range(filters[0]))
    for f in filters:
        dense.update(range(f, min(num_layers, f + wait_layers + 1)))
    bounds = [*filters, num_layers]
    segments = {f: tuple(layer for layer in range(f, nxt) if layer not in dense) for f, nxt in pairwise(bounds)}
    return LayerPlan(num_layers, filters, tuple(sorted(dense)), segments)


def score_prompt(selector: str, queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Importance `[t]` of prompt keys `[kv_heads, t, d]` for `queries` `[heads, m, d]` (oldest first).

    - last: pre-softmax logit of the newest query, max over heads;
    - softmax_last: softmax over the prompt keys per head for the newest query, then max over heads;
    - uniform / exp: the softmax_last score of each of the m queries, summed with weight 1 or 2^-age
      (age 0 = newest query).
    """
    if selector == "last":
        return max_head_logits(queries[:, -1], keys, scale)
    if selector == "softmax_last":
        queries = queries[:, -1:]
    probs = heads_max(grouped_logits(queries, keys, scale).softmax(-1).amax(0))  # [m, t]
    if selector == "softmax_last":
        return probs[0]
    age = torch.arange(probs.shape[0] - 1, -1, -1, device=probs.device, dtype=probs.dtype)
    weights = torch.ones_like(age) if selector == "uniform" else 0.5**age
    return weights @ probs


@dataclass
class OmniKV(Method):
    """OmniKV's decode: filter layers select the prompt context of the sparse layers after them.

    filter_layers: layers that select (None: the paper's 2, 8, 18 of 32, scaled to the model's depth).
    budget: prompt tokens selected per filter layer and step: a count, or a fraction of the prompt
        (the paper's fraction default is 0.067). Generated tokens are always attended besides.
    selector: "last" (paper default), "softmax_last", "uniform" or "exp" (see `score_prompt`).
    window: queries the windowed selectors ("uniform", "exp") sum over, the newest one included.
    wait_layers: dense layers after each filter layer; they overlap the packed load on CUDA.
    offload: keep the sparse layers' prompt KV in host memory (False: on the device, selected by index).
    """

    name: ClassVar[str] = "omnikv"

    filter_layers: tuple[int, ...] | None = None
    budget: int | float = 2048
    selector: str = "last"
    window: int = 16
    wait_layers: int = 1
    offload: bool = True

    def __post_init__(self):
        resolve_budget(self.budget, 1)  # type and sign errors now, not at the first generation
        if self.selector not in SELECTORS:
            raise ValueError(f"unknown selector {self.selector!r}: choose one of {', '.join(SELECTORS)}")
        require_int(self.window, "window", 1, " (queries summed by windowed selectors)")
        require_int(self.wait_layers, "wait_layers", 0)
        if self.filter_layers is not None:
            self.filter_layers = tuple(self.filter_layers)
            if not self.filter_layers or not all(isinstance(f, int) and f >= 0 for f in self.filter_layers):
                raise ValueError(f"filter_layers must be non-empty layer indices >= 0, got {self.filter_layers!r}")

    def layer_plan(self, num_layers: int, spec: ModelSpec | None = None) -> LayerPlan:
        """The layer plan for a `num_layers`-deep model; with the model's `spec`, each filter layer moves to its
        nearest global layer (a windowed layer's query sees only its window, not the prompt it selects from)."""
        filters = self.filter_layers or scaled_layers(PAPER_FILTER_LAYERS, PAPER_DEPTH, num_layers)
        if spec is not None:
            filters = tuple(spec.nearest_global_layer(f) for f in filters)
        return plan_layers(filters, self.wait_layers, num_layers)

    def start(self, run: Run) -> Policy:
        return OmniKVPolicy(self, run)

    needs_shared_kv: ClassVar[bool] = True

    def as_prefill_side(self) -> Method:
        raise ValueError(
            "OmniKV's prefill is dense (it selects prompt KV in decode): put it on the decode side, "
            "e.g. 'sliminfer+omnikv'"
        )

    @classmethod
    def keep_all(cls) -> OmniKV:
        return cls(budget=1.0)


def _with_tail(
    keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, absent: torch.Tensor | None, tail: Context
) -> Context:
    """Selected prompt keys/values at `positions` (masking those the layer lacks), then the `tail` entries
    (generated tokens and later turns, always attended)."""
    k, v, pos = torch.cat([keys, tail.k], 1), torch.cat([values, tail.v], 1), torch.cat([positions, tail.pos])
    if absent is None:
        return Context(k, v, pos)
    hidden = torch.cat([absent, absent.new_zeros(len(tail.pos))])
    return Context(k, v, pos, hidden, absent.sum())  # counted on the device: no sync per layer


class OmniKVPolicy(Policy):
    """One generation's selections, host store and transfers."""

    def __init__(self, method: OmniKV, run: Run):
        super().__init__(run)
        self.method = method
        self.plan = method.layer_plan(run.spec.num_layers, run.spec)
        self.budget = resolve_budget(method.budget, run.prompt_len)
        segments = self.plan.segments.items() if method.offload else ()
        self.stores = {f: PackedSegment(layers, run.transfers, run.prompt_len) for f, layers in segments if layers}
        self.recent: dict[int, torch.Tensor] = {}  # filter layer -> last `window` queries [heads, m, d]
        self.selected: dict[int, torch.Tensor] = {}  # filter layer -> sorted prompt positions of this step
        self.loading: dict[int, Pending] = {}  # filter layer -> packed load of this step
        self.steps = 0

    # -- prefill: dense; remember the filter layers' last queries, move sparse layers' prompt KV away --
    def prefill_observe(self, step: LayerStep) -> None:
        if self.method.selector in WINDOWED and step.layer in self.plan.segments:
            self.recent[step.layer] = step.q[:, -self.method.window :].clone()  # not a view that pins all of q

    def prefill_layer_done(self, step: LayerStep) -> None:
        layer, kv = step.layer, step.kv
        segment = self.plan.segment_of(layer)
        if segment in self.stores:
            self.stores[segment].put(layer, kv.keys, kv.values, kv.positions)
            # The device keeps only what decode appends: this layer's tail of generated tokens. The layer's
            # KV records the positions it now holds on the host.
            kv.offload(torch.arange(len(kv), device=kv.positions.device))

    # -- decode ------------------------------------------------------------------------------------------
    def decode_context(self, step: LayerStep) -> Context:
        layer, kv = step.layer, step.kv
        if layer in self.plan.segments:
            self._select(layer, step.q[:, -1], kv)
            return Context.of(kv)
        segment = self.plan.segment_of(layer)
        if segment is None:
            return Context.of(kv)
        return self._sparse_context(layer, segment, kv)

    def _select(self, filter_layer: int, query: torch.Tensor, kv: LayerKV) -> None:
        """Score the prompt with the current query, keep the top `budget`, start the segment's load."""
        queries = query[:, None]
        if self.method.selector in WINDOWED:
            queries = torch.cat([self.recent[filter_layer], queries], 1)[:, -self.method.window :]
            self.recent[filter_layer] = queries
        count = kv.leading(Kind.PROMPT)  # a filter layer keeps its prompt entries on the device, before the rest
        scores = score_prompt(self.method.selector, queries, kv.keys[:, :count], self.run.scale)
        # Ascending order keeps the dense context order, so a budget covering the prompt is exactly dense.
        index = scores.topk(min(self.budget, count)).indices.sort().values
        positions = index if count == self.run.prompt_len else kv.positions[index]
        self.selected[filter_layer] = positions
        store = self.stores.get(filter_layer)
        if store is not None:
            self.loading[filter_layer] = store.load(positions)

    def _sparse_context(self, layer: int, segment: int, kv: LayerKV) -> Context:
        """The segment's selected prompt tokens that this layer holds, then every generated token (the tail)."""
        positions = self.selected[segment]
        if not self.method.offload:
            count = kv.leading(Kind.PROMPT)
            complete = count == self.run.prompt_len
            slots, absent = (positions, None) if complete else find_sorted(kv.positions[:count], positions)
            # index_select, not advanced indexing: several times faster on CPU for this gather.
            keys, values = kv.keys.index_select(1, slots), kv.values.index_select(1, slots)
            tail = Context(kv.keys[:, count:], kv.values[:, count:], kv.positions[count:])
            return _with_tail(keys, values, positions, absent, tail)
        keys, values = self.stores[segment].keys_values(self.loading[segment].wait(), layer)
        return _with_tail(keys, values, positions, self._host_lacks(kv, positions), Context.of(kv))

    def _host_lacks(self, kv: LayerKV, positions: torch.Tensor) -> torch.Tensor | None:
        """Which of prompt `positions` a sparse layer does not hold on the host; None when it holds them all."""
        return None if kv.host_count == self.run.prompt_len else kv.host_lacks(positions)

    def decode_step_done(self) -> None:
        self.steps += 1
        self.loading.clear()  # release this step's loaded rows

    # -- a later turn: nothing was dropped, so its rows attend to every earlier token ----------------------
    def extend_context(self, step: LayerStep) -> Context:
        layer, kv = step.layer, step.kv
        store = self.stores.get(self.plan.segment_of(layer))
        if store is None:
            return Context.of(kv)
        keys, values = store.layer_keys_values(layer, kv.keys.device)
        positions = torch.arange(self.run.prompt_len, device=kv.positions.device)
        return _with_tail(keys, values, positions, self._host_lacks(kv, positions), Context.of(kv))

    # -- accounting --------------------------------------------------------------------------------------
    def host_bytes(self) -> int:
        return sum(store.nbytes for store in self.stores.values())

    def stats(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "budget_tokens": self.budget,
            "prompt_fraction_selected": self.budget / self.run.prompt_len,
            "filter_layers": list(plan.filter_layers),
            "filter_layers_asked": list(self.method.layer_plan(plan.num_layers).filter_layers),  # before moving
            "dense_layers": list(plan.dense_layers),
            "sparse_layers": list(plan.sparse_layers),
        }
