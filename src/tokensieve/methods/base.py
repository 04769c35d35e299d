"""The policy interface: the questions the engine asks at every layer, and the dense answers.

A *method* is a small dataclass of settings (`Method`); for each session it starts a *policy* (`Policy`),
the object that holds that session's state (selected blocks, host stores, aux caches) and answers the
engine's questions. Every per-layer hook receives one `LayerStep`: the layer, the rows computed there,
their queries and keys (always matching the rows) and the layer's KV. Observation is separate from
decisions: `prefill_observe` only looks; the other hooks decide.

The layer's KV (`LayerKV`) records per entry its original position and its `Kind` (which pass computed it),
and the positions it holds in host memory: a policy reads the layout there (`kv.leading(Kind.PROMPT)`,
`kv.runs()`, `kv.host_lacks(...)`) rather than assuming the one another policy left, and moves entries
through it (`keep`, `move_last_to`, `offload`, `swap`), so the record stays true (docs/engine.md).

prefill, at layer l (rows = tokens still present, sorted by position; their KV is in `step.kv`)
  - `prefill_observe`: score or record what later decisions need (SnapKV, H2O, OmniKV)
  - `prefill_keep_after_attention`: which rows continue into layer l's MLP and later layers (SlimInfer)
  - `prefill_keep_after_layer`: which rows enter layer l+1 (LazyLLM)
  - `prefill_layer_done`: layer l's prompt KV is complete: evict or offload part of it
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

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ..cache import LayerKV
from ..model import ModelSpec
from ..offload import Transfers


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
        return Rows(h, self.pos)  # not dataclasses.replace: a decode step calls this per sequence and layer

    @staticmethod
    def cat(parts: list[Rows]) -> Rows:
        return Rows(torch.cat([p.h for p in parts]), torch.cat([p.pos for p in parts]))


@dataclass
class Context:
    """Keys, values `[kv_heads, t, head_dim]` and positions `[t]` a layer attends to in one decode step.

    `hidden` (bool `[t]`, optional) leaves some of those entries out by masking instead of copying: the
    cheaper choice when a policy drops only a few of a layer's cached keys. `hidden_count` is its number of
    True entries: an int where the policy knows it on the host, otherwise a 0-dim tensor on the device,
    which the engine adds to its counts there (`attended`), so a decode step needs no device sync per layer.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    hidden: torch.Tensor | None = None
    hidden_count: int | torch.Tensor = 0

    @staticmethod
    def of(kv: LayerKV, index: torch.Tensor | None = None) -> Context:
        if index is None:
            return Context(kv.keys, kv.values, kv.positions)
        return Context(kv.keys[:, index], kv.values[:, index], kv.positions[index])

    def attended(self) -> int | torch.Tensor:
        """The number of keys attended: a device tensor when `hidden_count` is one (no sync)."""
        return self.pos.shape[0] - self.hidden_count

    def __len__(self) -> int:
        """The number of keys attended, on the host: a device sync when `hidden_count` is a tensor, so for
        prompt passes, not for decode layers (the engine counts those with `attended`)."""
        return int(self.attended())


@dataclass
class Run:
    """What a policy knows about the session it serves: the first prompt's length, not how long it will run.

    `transfers` is the session's one channel for host <-> device copies: the engine reads what it moved.
    """

    spec: ModelSpec
    prompt_len: int
    device: torch.device
    dtype: torch.dtype
    scale: float
    transfers: Transfers | None = None

    def __post_init__(self):
        if self.transfers is None:
            self.transfers = Transfers(self.device)


@dataclass
class LayerStep:
    """One layer as a hook sees it: the rows computed there, their queries `[heads, n, d]` and keys
    `[kv_heads, n, d]` (RoPE applied, matching `rows` row for row) and the layer's KV cache."""

    layer: int
    rows: Rows
    q: torch.Tensor
    k: torch.Tensor
    kv: LayerKV

    def select(self, index: torch.Tensor | None) -> LayerStep:
        """The step restricted to rows `index` (None: all), queries and keys along."""
        if index is None:
            return self
        return LayerStep(self.layer, self.rows.select(index), self.q[:, index], self.k[:, index], self.kv)

    def with_rows(self, rows: Rows) -> LayerStep:
        """The same rows with new hidden states (after the MLP)."""
        return LayerStep(self.layer, rows, self.q, self.k, self.kv)


class Policy:
    """Dense answers to every question; methods override the hooks they need.

    `trims_windows`: the engine may free a windowed layer's KV older than the window (no later query sees
    it). Only a policy that keeps no per-entry state of its own (slots, scores, prompt counts) allows it:
    the dense one; every method keeps its default False.
    `dense_decode`: every decode hook gives the dense answer (the new token's row, the whole layer's KV, no
    state), so the engine may decode the sequence without asking, its attention in one call with other such
    sequences' (`engine/pool.py`). Only the dense policy says so.
    """

    trims_windows: ClassVar[bool] = False
    dense_decode: ClassVar[bool] = False

    def __init__(self, run: Run):
        self.run = run

    # -- prefill ---------------------------------------------------------------------------------------
    def prefill_observe(self, step: LayerStep) -> None:
        """Look at layer `step.layer` after its attention (scores, recent queries); decide nothing."""

    def prefill_keep_after_attention(self, step: LayerStep) -> torch.Tensor | None:
        """Indices of `step.rows` whose hidden states continue past this layer's attention, or None (all)."""
        return None

    def prefill_keep_after_layer(self, step: LayerStep) -> torch.Tensor | None:
        """Indices of `step.rows` (after the layer's MLP) that enter the next layer, or None (all)."""
        return None

    def prefill_layer_done(self, step: LayerStep) -> None:
        """The layer's prompt KV is complete in `step.kv`; an evicting or offloading policy acts here."""

    # -- decode ----------------------------------------------------------------------------------------
    def decode_step_start(self, position: int) -> None:
        """A decode step for the token at `position` begins (every earlier position has KV or was dropped)."""

    def decode_rows(self, layer: int, rows: Rows) -> Rows:
        """Rows computed at `layer` in this step; the new token is always the last row."""
        return rows

    def decode_context(self, step: LayerStep) -> Context:
        """What the rows attend to; `step.kv` already holds the rows' own new entries."""
        return Context.of(step.kv)

    def decode_layer_done(self, step: LayerStep, context: Context) -> Rows:
        """Rows that continue to the next layer (`step.rows` after the MLP); the new token stays the last row."""
        return step.rows

    def decode_step_done(self) -> None:
        """One decode step is complete (a place to settle asynchronous copies or count swaps)."""

    # -- extend ----------------------------------------------------------------------------------------
    def extend_context(self, step: LayerStep) -> Context:
        """What a later turn's rows attend to: by default every entry the layer holds on the device."""
        return Context.of(step.kv)

    def extend_layer_done(self, step: LayerStep) -> None:
        """The turn's rows have their KV in `step.kv` and continue to the next layer."""

    # -- accounting ------------------------------------------------------------------------------------
    def device_bytes(self) -> int:
        """Bytes the policy keeps on the device beyond the engine's per-layer KV (e.g. score tables)."""
        return 0

    def host_bytes(self) -> int:
        """Bytes of KV (or hidden states) the policy keeps in host memory."""
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
    if not budget > 0:  # NaN fails this too
        raise ValueError(f"{what} must be > 0 (a token count or a fraction in (0, 1]), got {budget}")
    if isinstance(budget, float):
        if budget > 1:
            raise ValueError(f"{what} {budget} is a float above 1: give a fraction in (0, 1] or an int token count")
        return max(1, min(prompt_len, round(budget * prompt_len)))
    return min(prompt_len, budget)


def require_int(value: Any, what: str, minimum: int = 1, note: str = "") -> int:
    """`value`, an int >= `minimum` (a bool is not a count here); otherwise a ValueError naming `what`.

    `note` follows the bound in the message, e.g. " (the paper uses 32)".
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}{note}, got {value!r}")
    return value


def scaled_layers(paper_layers: tuple[int, ...], paper_depth: int, num_layers: int) -> tuple[int, ...]:
    """A paper's layer positions for a `paper_depth`-layer model, scaled to `num_layers` (distinct, in range)."""
    scaled = sorted({min(num_layers - 1, round(layer * num_layers / paper_depth)) for layer in paper_layers})
    return tuple(scaled)


@dataclass
class Method:
    """Settings of a method. Subclasses are dataclasses named like the paper and override `start`."""

    name: ClassVar[str] = "dense"
    kv_layout: ClassVar[str] = "shared"  # "per_head": each KV head keeps its own entries (SnapKV, H2O)
    needs_shared_kv: ClassVar[bool] = False  # cannot follow a per-head eviction (OmniKV's shared selection, H2O)

    def start(self, run: Run) -> Policy:
        """A fresh policy for one generation."""
        return DensePolicy(run)

    @classmethod
    def keep_all(cls) -> Method:
        """Settings under which the method keeps every token, so it must reproduce dense exactly.

        The shared test matrix runs every registered method with these settings.
        """
        return cls()

    def as_prefill_side(self) -> Method:
        """These settings as the prefill side of a composition (`Compose`): only the method's prefill decisions.

        Methods whose prefill is dense (they act on the KV) raise a ValueError saying where they belong.
        """
        return self

    def as_decode_side(self) -> Method:
        """These settings as the decode side of a composition: what the method does with the KV prefill left.

        Methods whose decode needs their own prefill raise a ValueError saying so.
        """
        return self

    def settings(self) -> dict[str, Any]:
        """The method's name and settings, as reported in the stats."""
        return {"name": self.name, **asdict(self)}


class DensePolicy(Policy):
    """The dense answers, and windowed layers keep only their window."""

    trims_windows: ClassVar[bool] = True
    dense_decode: ClassVar[bool] = True


@dataclass
class Dense(Method):
    """Every token at every layer: the model as Hugging Face runs it."""

    name: ClassVar[str] = "dense"
