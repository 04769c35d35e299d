"""Composition: one method's prefill decisions, another's decode (and later turns), in one session.

`Compose(prefill=SlimInfer(...), decode=OmniKV(...))`, or the spec `"sliminfer+omnikv"`. Prefill side:
dense, SlimInfer (block pruning of hidden states), LazyLLM (its prefill, as static pruning), SnapKV (its
eviction after prefill). Decode side: dense, OmniKV, StreamingLLM, H2O, SlimInfer's block manager, LazyLLM's
dynamic reselection (without revival). Each method says which side it can take (`Method.as_prefill_side` /
`as_decode_side`) and why not, so a pair that cannot mean anything is a clear error.

How the two sides share a layer: both observe the layer (`prefill_observe`) before any decision, so the
decode side sees every row that entered it; the prefill side decides which rows continue; then each side's
`prefill_layer_done` runs on the layer's KV, the prefill side first. From then on the decode side alone
manages the KV, and it selects among the entries each layer actually holds, by original position (after
SlimInfer's prefill, layers past a pruning layer hold only the kept blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import Context, Dense, LayerStep, Method, Policy, Rows, Run


@dataclass
class Compose(Method):
    """`prefill`'s decisions in prefill, `decode`'s in decode; `Compose(X, Dense())` prefills as X does and
    then decodes densely over what X left, `Compose(Dense(), Y)` decodes exactly as Y does."""

    name: ClassVar[str] = "compose"

    prefill: Method
    decode: Method

    def __post_init__(self):
        for side, method in (("prefill", self.prefill), ("decode", self.decode)):
            if not isinstance(method, Method) or isinstance(method, Compose):
                raise TypeError(f"Compose's {side} side must be one method (a Method instance), got {method!r}")
        self.prefill_side = self.prefill.as_prefill_side()
        self.decode_side = self.decode.as_decode_side()
        if self.prefill.kv_layout == "per_head" and self.decode.needs_shared_kv:
            raise ValueError(
                f"{self.prefill.name} leaves each KV head its own tokens, which {self.decode.name} cannot take over "
                f"(it needs every head to hold the prompt as prefill left it): pair {self.prefill.name} with dense "
                "or streaming_llm decode"
            )

    @property
    def spec_name(self) -> str:
        return f"{self.prefill.name}+{self.decode.name}"

    def start(self, run: Run) -> Policy:
        return ComposedPolicy(self, run)

    @classmethod
    def keep_all(cls) -> Compose:
        return cls(Dense(), Dense())

    def settings(self) -> dict[str, Any]:
        # The settings each side runs with (e.g. SlimInfer's prefill side has kv_manager=False).
        return {"name": self.spec_name, "prefill": self.prefill_side.settings(), "decode": self.decode_side.settings()}


class ComposedPolicy(Policy):
    """Routes each hook to the side it belongs to (see the module docstring)."""

    def __init__(self, method: Compose, run: Run):
        super().__init__(run)
        self.first = method.prefill_side.start(run)
        self.then = method.decode_side.start(run)

    # -- prefill: both observe, the prefill side decides, both act on the finished layer's KV ----------
    def prefill_observe(self, step: LayerStep) -> None:
        self.first.prefill_observe(step)
        self.then.prefill_observe(step)

    def prefill_keep_after_attention(self, step: LayerStep) -> torch.Tensor | None:
        return self.first.prefill_keep_after_attention(step)

    def prefill_keep_after_layer(self, step: LayerStep) -> torch.Tensor | None:
        return self.first.prefill_keep_after_layer(step)

    def prefill_layer_done(self, step: LayerStep) -> None:
        self.first.prefill_layer_done(step)
        self.then.prefill_layer_done(step)

    # -- decode and later turns: the decode side ----------------------------------------------------------
    def decode_step_start(self, position: int) -> None:
        self.then.decode_step_start(position)

    def decode_rows(self, layer: int, rows: Rows) -> Rows:
        return self.then.decode_rows(layer, rows)

    def decode_context(self, step: LayerStep) -> Context:
        return self.then.decode_context(step)

    def decode_layer_done(self, step: LayerStep, context: Context) -> Rows:
        return self.then.decode_layer_done(step, context)

    def decode_step_done(self) -> None:
        self.then.decode_step_done()

    def extend_context(self, step: LayerStep) -> Context:
        return self.then.extend_context(step)

    def extend_layer_done(self, step: LayerStep) -> None:
        self.then.extend_layer_done(step)

    # -- accounting: both sides ---------------------------------------------------------------------------
    def device_bytes(self) -> int:
        return self.first.device_bytes() + self.then.device_bytes()

    def host_bytes(self) -> int:
        return self.first.host_bytes() + self.then.host_bytes()

    def stats(self) -> dict[str, Any]:
        return {"prefill": self.first.stats(), "decode": self.then.stats()}
