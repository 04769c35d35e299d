"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024).

The first few tokens of a sequence collect a large share of attention whatever their content ("attention
sinks"); a model keeps working when its cache holds only those sink tokens plus a window of the most
recent tokens. Everything in between is evicted for good: it is a token-*dropping* baseline, the contrast
to OmniKV, which keeps every token and only chooses which ones to read.

Here the prompt is prefilled densely (every token attends to the full prompt), then each layer's cache is
cut to `sink + window` entries; during decoding the cache stays at that size by evicting its oldest
non-sink entry as each new token arrives.

Positions: the paper re-numbers cached tokens by their slot in the cache, so that a stream can run past
the model's pretraining length. tokensieve keeps original positions (DESIGN.md invariant 3) and the
engine never runs past the model's positions, so kept keys are not re-rotated; the relative distance from
a query to the sink tokens is therefore its true distance, not the in-cache one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..cache import LayerKV
from .base import Context, LayerStep, Method, Policy, Run, require_int, resolve_budget


@dataclass
class StreamingLLM(Method):
    """Keep the first `sink` tokens and the `window` most recent ones at every layer; evict the rest.

    `sink`: attention-sink tokens at the start of the prompt that are never evicted (paper: 4).
    `window`: recent tokens kept, as a token count, or a float in (0, 1] for a fraction of the prompt.
    The defaults give the paper's main cache of 1024 entries ("4+1020"); a prompt of up to `sink + window`
    tokens is kept whole. `None` never evicts (the dense model: `keep_all`).
    After prefill, the cache of every layer holds at most `sink + window` entries at all times.
    """

    name: ClassVar[str] = "streaming_llm"

    sink: int = 4
    window: int | float | None = 1020

    def __post_init__(self):
        require_int(self.sink, "sink", 0, " (the paper uses 4)")
        if self.window is not None:
            resolve_budget(self.window, 1, "window")  # type and sign are checked here, with clear messages

    def as_prefill_side(self) -> Method:
        raise ValueError(
            "StreamingLLM's prefill is dense (it evicts KV after prefill and in decode): put it on the decode side, "
            "e.g. 'sliminfer+streaming_llm'"
        )

    @classmethod
    def keep_all(cls) -> StreamingLLM:
        return cls(window=None)

    def start(self, run: Run) -> Policy:
        return StreamingPolicy(self, run)


class StreamingPolicy(Policy):
    def __init__(self, method: StreamingLLM, run: Run):
        super().__init__(run)
        self.sink = method.sink
        self.window = _window_tokens(method.window, run.prompt_len)
        layers = run.spec.num_layers
        self.kept_after_prefill = [0] * layers
        self.evicted_in_prefill = [0] * layers
        self.evicted_in_decode = [0] * layers
        self.cache_tokens = [0] * layers
        # Decode evicts in place: the window's slots form a ring and `oldest[layer]` is the slot of its
        # oldest entry, which the new token's entry overwrites (attention masks by position, not by slot).
        self.oldest = [self.sink] * layers

    def prefill_layer_done(self, step: LayerStep) -> None:
        layer, kv = step.layer, step.kv
        self.evicted_in_prefill[layer] = self._evict(kv)
        self.kept_after_prefill[layer] = self.cache_tokens[layer] = len(kv)

    def decode_context(self, step: LayerStep) -> Context:
        layer, kv = step.layer, step.kv
        # The engine has appended this step's entry already, so evicting here keeps the new token.
        if self.window is not None and len(kv) > self.sink + self.window:
            kv.move_last_to(self.oldest[layer])
            self.oldest[layer] = self.sink + (self.oldest[layer] - self.sink + 1) % self.window
            self.evicted_in_decode[layer] += 1
        self.cache_tokens[layer] = len(kv)
        return Context.of(kv)

    def extend_layer_done(self, step: LayerStep) -> None:
        """A later turn saw the window and itself; the cache is then cut back to the sinks and the window."""
        layer, kv = step.layer, step.kv
        self.evicted_in_decode[layer] += self._evict(kv)
        self.oldest[layer] = self.sink  # `_evict` left the entries in position order
        self.cache_tokens[layer] = len(kv)

    def _evict(self, kv: LayerKV) -> int:
        """Cut `kv` to its first `sink` entries and its `window` newest; returns how many were evicted.

        The sinks hold the first slots (decode's ring never overwrites them); the rest is sorted by position,
        so that slot order is age order again (and the ring starts at `sink`).
        """
        if self.window is None or len(kv) <= self.sink + self.window:
            return 0
        evicted = len(kv) - self.sink - self.window
        rest = kv.positions[self.sink :].argsort()[evicted:] + self.sink
        keep = torch.cat([torch.arange(self.sink, device=rest.device), rest])
        kv.keep(keep)
        return evicted

    def stats(self) -> dict[str, Any]:
        capacity = None if self.window is None else self.sink + self.window
        return {
            "cache_capacity_tokens": capacity,
            "kept_after_prefill_per_layer": self.kept_after_prefill,
            "evicted_in_prefill_per_layer": self.evicted_in_prefill,
            "evicted_in_decode_per_layer": self.evicted_in_decode,
            "cache_tokens_per_layer": self.cache_tokens,
        }


def _window_tokens(window: int | float | None, prompt_len: int) -> int | None:
    """The window in tokens: a count as given (it also bounds decode), a fraction of the prompt rounded."""
    if window is None or isinstance(window, int):
        return window
    return resolve_budget(window, prompt_len, "window")
