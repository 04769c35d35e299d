"""What a generation returns (text, tokens, stats), token sampling and stop-string handling."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import inputs


@dataclass
class Stats:
    """Every decision a method made, visible. Method issues extend this; they never rename a field."""

    method: dict[str, Any]
    prompt_tokens: int = 0  # tokens this call's prefill (or a session's extension) computed
    context_tokens: int = 0  # tokens of the session before this call's new tokens (the whole prompt, one-shot)
    reused_tokens: int = 0  # of those, tokens whose KV an earlier call computed
    new_tokens: int = 0
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    prefill_tokens_per_layer: list[int] = field(default_factory=list)
    prefill_mlp_tokens_per_layer: list[int] = field(default_factory=list)  # fewer where a layer pruned mid-way
    decode_keys_per_layer: list[float] = field(default_factory=list)  # mean over decode steps
    decode_rows_per_layer: list[float] = field(default_factory=list)  # mean: the new token plus revived ones
    kv_bytes_device: int = 0
    kv_bytes_host: int = 0
    host_is_device: bool = False  # on CPU "host" and "device" are one memory: the KV is held once, split between them
    kv_bytes_reserved: int = 0  # device bytes allocated for KV, spare capacity for later tokens included
    unseen_tokens_per_layer: list[int] = field(default_factory=list)  # a later turn: earlier tokens it could not see
    revived_tokens: int = 0  # token-layer computations in decode beyond the new token (LazyLLM's revival)
    host_bytes_loaded_per_step: float = 0.0  # KV bytes copied from host memory per decode step
    host_loads_per_step: float = 0.0  # host -> device copies started per decode step (a SlimInfer swap is one)
    host_rows_loaded_per_step: float = 0.0  # host store rows copied per step (SlimInfer: blocks; OmniKV: tokens)
    method_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_fraction(self) -> float:
        """Token-layer computations in prefill relative to dense (1.0 = nothing skipped)."""
        layers = len(self.prefill_tokens_per_layer)
        return sum(self.prefill_tokens_per_layer) / max(1, layers * self.prompt_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prefill_fraction": self.prefill_fraction}


@dataclass
class Generation:
    """The result of `Engine.generate`: new text, new token ids, stats and why generation stopped."""

    text: str
    token_ids: list[int]
    stats: Stats
    finish_reason: str  # "eos", "stop", "length", or "cancelled" (a stream closed early)


@dataclass(frozen=True)
class Sampling:
    """Greedy when `temperature == 0`; otherwise temperature and nucleus (top-p) sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "temperature", inputs.temperature(self.temperature))
        object.__setattr__(self, "top_p", inputs.top_p(self.top_p))
        object.__setattr__(self, "seed", inputs.seed(self.seed))

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """The next token from fp32 `logits` `[vocab]`."""
        if self.temperature == 0:
            return int(logits.argmax())
        probs = (logits / self.temperature).softmax(-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Turns a growing list of token ids into text pieces that are final: no piece is ever revised.

    Text that could still become a stop string, or that ends in an incomplete UTF-8 sequence, is held
    back until the next token decides it. When generation ends (`finish`), an incomplete multi-byte
    character at the end (its last bytes were never generated) is dropped rather than shown as U+FFFD.
    Without a tokenizer (a checkpoint with none, run on token ids) there is no text: only the ids.
    """

    def __init__(self, tokenizer, stop: list[str]):
        if tokenizer is None and stop:
            raise ValueError("stop strings need a tokenizer to decode the text; this engine has none")
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the new final text (possibly empty). Sets `stopped` on a stop string."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.flush()
        end = len(self.text) - self._holdback()
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def flush(self) -> str:
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece

    def finish(self) -> str:
        """The held-back rest of the text once no token follows, less a trailing incomplete character."""
        if not self.stopped:  # before a stop string, a U+FFFD is a real invalid sequence: kept
            self.text = self.text[: self.emitted] + self.text[self.emitted :].rstrip("\ufffd")
        return self.flush()

    def _holdback(self) -> int:
        """Characters at the end of the text that the next tokens may still change."""
        held = 0
        if self.text.endswith("\ufffd"):  # maybe a UTF-8 sequence split over tokens: at most its last 3 tokens
            stable = self.tokenizer.decode(self.ids[:-3], skip_special_tokens=True)
            held = len(self.text) - len(os.path.commonprefix([stable, self.text]))
        partial = [n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])]
        return max([held, *partial])
