"""The policy interface: the questions the engine asks at every layer, and the dense answers.

A *method* is a small dataclass of settings (`Method`); for each generation it starts a *policy*
(`Policy`), the object that holds that generation's state (selected blocks, host stores, aux caches)
and answers the engine's questions:

prefill, at layer l (rows = tokens still present, sorted by position)
  - `prefill_keep_after_attention`: which rows continue into layer l's MLP and later layers (SlimInfer)
  - `prefill_keep_after_layer`: which rows enter layer l+1 (LazyLLM)
  - `prefill_layer_done`: layer l's KV is complete; move what belongs elsewhere (offload)
decode, at layer l (after `decode_step_start(position)` once per step)
  - `decode_rows`: which rows are computed here: the new token, plus revived tokens (LazyLLM)
  - `decode_context`: which cached keys/values the rows attend to (OmniKV, SlimInfer, LazyLLM)
  - `decode_layer_done`: which rows continue to layer l+1
extend (a later turn of a session, all its rows computed at every layer), at layer l
  - `extend_context`: which cached keys/values the turn's rows attend to (the layer already holds theirs)
  - `extend_layer_done`: the turn's KV is in the layer; an evicting policy cuts back to its budget here

The dense policy answers "all of them" everywhere. Returning `None` from a keep hook means keep all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import torch

from ..cache import LayerKV
from ..model import ModelSpec


@dataclass
class Rows:
    """The tokens computed at a layer: hidden states `[n, hidden]` and original positions `[n]`."""

    h: torch.Tensor
    pos: torch.Tensor

    def __len__(self) -> int:
        return self.pos.shape[0]

    def select(self, index: torch.Tensor) -> Rows:
        return Rows(self.h[index], self.pos[index])

    def with_h(self, h: torch.Tensor) -> Rows:
        return replace(self, h=h)

    @staticmethod
    def cat(parts: list[Rows]) -> Rows:
        return Rows(torch.cat([p.h for p in parts]), torch.cat([p.pos for p in parts]))


@dataclass
class Context:
    """Keys, values `[kv_heads, t, head_dim]` and positions `[t]` a layer attends to in one decode step.

    `hidden` (bool `[t]`, optional) leaves some of those entries out by masking instead of copying: the
    cheaper choice when a policy drops only a few of a layer's cached keys. `hidden_count` is its number of
    True entries, given by the policy (which knows it) so that `len()` needs no device sync per layer.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    hidden: torch.Tensor | None = None
    hidden_count: int = 0

    @staticmethod
    def of(kv: LayerKV, index: torch.Tensor | None = None) -> Context:
        if index is None:
            return Context(kv.keys, kv.values, kv.positions)
        return Context(kv.keys[:, index], kv.values[:, index], kv.positions[index])

    def __len__(self) -> int:
        """The number of keys attended."""
        return self.pos.shape[0] - self.hidden_count


@dataclass
class Run:
    """What a policy knows about the session it serves: the first prompt's length, not how long it will run."""

    spec: ModelSpec
    prompt_len: int
    device: torch.device
    dtype: torch.dtype
    scale: float


class Policy:
    """Dense answers to every question; methods override the hooks they need."""

    def __init__(self, run: Run):
        self.run = run

    # -- prefill ---------------------------------------------------------------------------------------
    def prefill_keep_after_attention(
        self, layer: int, rows: Rows, q: torch.Tensor, k: torch.Tensor
    ) -> torch.Tensor | None:
        """Indices of `rows` whose hidden states continue past layer `layer`'s attention, or None (all).

        `q` `[heads, n, d]` and `k` `[kv_heads, n, d]` are this layer's queries and keys of the rows.
        """
        return None

    def prefill_keep_after_layer(self, layer: int, rows: Rows, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """Indices of `rows` (after layer `layer`) that enter layer `layer + 1`, or None (all)."""
        return None

    def prefill_layer_done(self, layer: int, kv: LayerKV) -> None:
        """Layer `layer`'s prompt KV is complete in `kv`; an offloading policy moves part of it away here."""

    # -- decode ----------------------------------------------------------------------------------------
    def decode_step_start(self, position: int) -> None:
        """A decode step for the token at `position` begins (every earlier position has KV or was dropped)."""

    def decode_rows(self, layer: int, rows: Rows) -> Rows:
        """Rows computed at `layer` in this step; the new token is always the last row."""
        return rows

    def decode_context(self, layer: int, q: torch.Tensor, rows: Rows, kv: LayerKV) -> Context:
        """What the rows attend to at `layer`; `kv` already holds the rows' own new entries."""
        return Context.of(kv)

    def decode_layer_done(self, layer: int, rows: Rows, q: torch.Tensor, context: Context) -> Rows:
        """Rows that continue to layer `layer + 1`; the new token must stay the last row."""
        return rows

    def decode_step_done(self) -> None:
        """One decode step is complete (a place to settle asynchronous copies or count swaps)."""

    # -- extend ----------------------------------------------------------------------------------------
    def extend_context(self, layer: int, rows: Rows, kv: LayerKV) -> Context:
        """What a later turn's rows attend to at `layer`: by default every entry the layer holds on the device."""
        return Context.of(kv)

    def extend_layer_done(self, layer: int, rows: Rows, q: torch.Tensor, kv: LayerKV) -> None:
        """The turn's rows (queries `q` `[heads, m, d]`) have their KV in `kv` and continue to layer `layer + 1`."""

    # -- accounting ------------------------------------------------------------------------------------
    def device_bytes(self) -> int:
        """Bytes the policy keeps on the device beyond the engine's per-layer KV (e.g. score tables)."""
        return 0

    def host_bytes(self) -> int:
        """Bytes of KV (or hidden states) the policy keeps in host memory."""
        return 0

    def revived_tokens(self) -> int:
        """Token-layer computations added by revival (LazyLLM); 0 for every other method."""
        return 0

    def stats(self) -> dict[str, Any]:
        """Method-specific figures merged into `Stats.method_stats` (e.g. blocks swapped per step)."""
        return {}


def resolve_budget(budget: int | float, prompt_len: int, what: str = "budget") -> int:
    """A budget given as a token count (int >= 1) or a fraction of the prompt (float in (0, 1]), in tokens.

    The result is at least 1 and never more than the prompt; a budget <= 0 is an error, not a no-op.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"{what} must be a token count (int) or a fraction of the prompt (float), got {budget!r}")
    if budget <= 0:
        raise ValueError(f"{what} must be > 0 (a token count or a fraction in (0, 1]), got {budget}")
    if isinstance(budget, float):
        if budget > 1:
            raise ValueError(f"{what} {budget} is a float above 1: give a fraction in (0, 1] or an int token count")
        return max(1, min(prompt_len, round(budget * prompt_len)))
    return min(prompt_len, budget)


def scaled_layers(paper_layers: tuple[int, ...], paper_depth: int, num_layers: int) -> tuple[int, ...]:
    """A paper's layer positions for a `paper_depth`-layer model, scaled to `num_layers` (distinct, in range)."""
    scaled = sorted({min(num_layers - 1, round(layer * num_layers / paper_depth)) for layer in paper_layers})
    return tuple(scaled)


@dataclass
class Method:
    """Settings of a method. Subclasses are dataclasses named like the paper and override `start`."""

    name: ClassVar[str] = "dense"

    def start(self, run: Run) -> Policy:
        """A fresh policy for one generation."""
        return Policy(run)

    @classmethod
    def keep_all(cls) -> Method:
        """Settings under which the method keeps every token, so it must reproduce dense exactly.

        The shared test matrix runs every registered method with these settings.
        """
        return cls()

    def settings(self) -> dict[str, Any]:
        """The method's name and settings, as reported in the stats."""
        return {"name": self.name, **asdict(self)}


@dataclass
class Dense(Method):
    """Every token at every layer: the model as Hugging Face runs it."""

    name: ClassVar[str] = "dense"
