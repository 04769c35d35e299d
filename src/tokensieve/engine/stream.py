"""One generation call of a session, token by token: sampling, stop strings, timing and its `Generation`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from ..generation import Generation, Sampling, Stats, TextStream
from ..methods import Method, Policy
from .loop import DecodeCounts, DecodeRequest, PromptPass


class StreamSource(Protocol):
    """What a stream needs of its session (`Session` is the one there is)."""

    engine: Any  # its tokenizer, model and eos_ids
    method: Method
    policy: Policy
    tokens: list[int]

    def next_logits(self, counts: DecodeCounts) -> torch.Tensor: ...
    def decode_request(self, counts: DecodeCounts) -> DecodeRequest | None: ...
    def decoded(self) -> None: ...
    def take_prompt_pass(self) -> PromptPass | None: ...
    def fill_memory_stats(self, stats: Stats) -> None: ...
    def call_done(self, generation: Generation) -> None: ...
    def close(self) -> None: ...


class GenerationStream(Iterator[str]):
    """The text pieces of one generation call, final as they come; `generation` holds the result once done.

    Each `next()` computes at most one token (one decode step), so a caller (a server, a scheduler) can
    interleave many streams. `close()` stops early: the generation ends with `finish_reason="cancelled"`,
    and the session stays usable (its tokens include what was generated so far).
    """

    def __init__(
        self,
        session: StreamSource,
        max_new_tokens: int,
        sampling: Sampling,
        stop: list[str],
        close_session: bool = False,
    ):
        self.session = session
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.text = TextStream(session.engine.tokenizer, stop)
        self.generator = sampling.generator(session.engine.model.device)
        self.close_session = close_session
        self.generation: Generation | None = None
        self.new_ids: list[int] = []
        self.step_times: list[float] = []
        self.counts = DecodeCounts.zeros(session.engine.model.spec.num_layers)
        self.loaded_before = session.policy.run.transfers.loaded
        self.context_tokens = len(session.tokens)
        self.prompt_pass = session.take_prompt_pass()
        self.ttft_s = 0.0

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        while self.generation is None:
            piece = self._advance()
            if piece:
                return piece
        raise StopIteration

    def close(self) -> None:
        """Stop generating now (e.g. the client went away)."""
        if self.generation is None:
            self._finish("cancelled")

    def decode_request(self) -> DecodeRequest | None:
        """The decode step this stream's next token needs (None: its logits are ready). A scheduler batches
        the requests of many streams, then gives each its logits with `take`."""
        return self.session.decode_request(self.counts)

    def take(self, logits: torch.Tensor | None, seconds: float) -> str:
        """Pick the next token from `logits` (None: the ready ones, after a prefill or extension), `seconds`
        after the step began; returns the text it made final."""
        start = _now(self.session.engine.model.device)
        if logits is None:
            logits = self.session.next_logits(self.counts)
        else:
            self.session.decoded()
        return self._pick(logits, seconds + _now(self.session.engine.model.device) - start)

    def _advance(self) -> str:
        """Pick one token (decoding the previous one first); returns the text it made final."""
        start = _now(self.session.engine.model.device)
        logits = self.session.next_logits(self.counts)
        return self._pick(logits, _now(self.session.engine.model.device) - start)

    def _pick(self, logits: torch.Tensor, elapsed: float) -> str:
        session = self.session
        token = self.sampling.pick(logits, self.generator)
        if self.new_ids:
            self.step_times.append(elapsed)
        else:
            self.ttft_s = elapsed + (self.prompt_pass.seconds if self.prompt_pass else 0.0)
        session.tokens.append(token)
        self.new_ids.append(token)
        if token in session.engine.eos_ids:
            return self._finish("eos")
        piece = self.text.push(token)
        if self.text.stopped:
            return piece + self._finish("stop")
        if len(self.new_ids) == self.max_new_tokens:
            return piece + self._finish("length")
        return piece

    def _finish(self, reason: str) -> str:
        session = self.session
        tail = self.text.finish()
        counts, steps = self.counts, max(1, self.counts.steps)
        stats = Stats(method=session.method.settings(), context_tokens=self.context_tokens)
        if self.prompt_pass is not None:
            stats.prompt_tokens = self.prompt_pass.tokens
            stats.prefill_tokens_per_layer = self.prompt_pass.tokens_per_layer
            stats.prefill_mlp_tokens_per_layer = self.prompt_pass.mlp_tokens_per_layer
            stats.unseen_tokens_per_layer = self.prompt_pass.unseen_per_layer
        stats.reused_tokens = self.context_tokens - stats.prompt_tokens
        stats.new_tokens = len(self.new_ids)
        stats.ttft_s = self.ttft_s
        stats.tpot_s = sum(self.step_times) / max(1, len(self.step_times))
        stats.decode_keys_per_layer = [n / steps for n in counts.keys_per_layer]
        stats.decode_rows_per_layer = [n / steps for n in counts.rows_per_layer]
        stats.revived_tokens = sum(counts.rows_per_layer) - counts.steps * len(counts.rows_per_layer)
        loaded = session.policy.run.transfers.loaded - self.loaded_before  # counted where the copies happen
        stats.host_bytes_loaded_per_step = loaded.bytes / steps
        stats.host_loads_per_step = loaded.loads / steps
        stats.host_rows_loaded_per_step = loaded.rows / steps
        session.fill_memory_stats(stats)
        self.generation = Generation(self.text.text, self.new_ids, stats, reason)
        session.call_done(self.generation)
        if self.close_session:
            session.close()
        return tail


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
