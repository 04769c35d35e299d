"""A session: one conversation's KV and policy state, kept between calls.

`engine.start(prompt)` prefills; `generate`/`stream` continue from the current state; `extend` appends a
turn, computing only tokens that have no KV yet. Every token of the conversation is in `tokens`; the last
sampled token of a call has no KV until the next call computes it (with the turn after it, or as the
first decode step).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .. import inputs
from ..cache import LayerKV
from ..generation import Generation, Sampling, Stats
from ..methods import Method
from ..model import DecoderModel
from . import loop
from .executor import Executor, PromptTask
from .stream import GenerationStream


class SessionHost(Protocol):
    """What a session needs of its engine (`Engine` is the one there is)."""

    model: DecoderModel
    tokenizer: Any
    executor: Executor  # runs every forward pass, under its lock
    eos_ids: set[int]

    def check_lengths(self, context_len: int, max_new_tokens: int) -> None: ...
    def encode(self, prompt: str | Sequence[int], chat: bool = False, special_tokens: bool = True) -> list[int]: ...
    def render_chat(self, messages: list[dict]) -> list[int]: ...


@dataclass
class SessionStats:
    """A session so far: the stats of each call, the tokens computed, and the memory it holds now."""

    calls: list[Stats] = field(default_factory=list)
    computed_tokens: int = 0
    kv_bytes_device: int = 0
    kv_bytes_host: int = 0
    kv_bytes_reserved: int = 0


class Session:
    """One conversation with one method; see the module docstring. Made by `Engine.start`."""

    def __init__(
        self,
        engine: SessionHost,
        ids: list[int],
        method: Method,
        chat_messages: list[dict] | None,
        chunk: int | None,
        defer_prefill: bool = False,
    ):
        self.engine = engine
        self.method = method
        self.chunk = chunk
        self.tokens: list[int] = list(ids)
        self.messages = chat_messages  # the conversation as chat messages, for chat=True sessions
        state = engine.executor.open(method, len(ids))
        self.key, self.policy = state.key, state.policy
        self.kv: list[LayerKV] | None = state.kv
        self.computed = 0  # tokens[:computed] have KV (or were seen and dropped by the method)
        self.calls: list[Stats] = []
        self._logits: torch.Tensor | None = None  # after tokens[computed - 1], when every token is computed
        self._prompt_pass: loop.PromptPass | None = None  # computed, not yet reported by a generation
        self._active: GenerationStream | None = None  # the unfinished stream of this session, if any
        self._active_thread: int | None = None
        self._prefill: PromptTask | None = None  # a prompt pass under way (`advance_prefill`) ...
        self._slot = 0  # ... and this session's place among its sequences
        self._unstarted: list[int] | None = list(ids)  # a first prompt whose pass is not set up yet
        if not defer_prefill:
            self.advance_prefill(engine.model.spec.num_layers)

    # -- public API ------------------------------------------------------------------------------------
    def generate(
        self,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Generation:
        """Generate up to `max_new_tokens` from the current state; greedy by default."""
        stream = self.stream(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        for _ in stream:
            pass
        return stream.generation

    def stream(
        self,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        close_session: bool = False,
    ) -> GenerationStream:
        """Like `generate`, as an iterator of text pieces; its `generation` is set when it is exhausted."""
        sampling, stops = self.check_settings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop
        )
        self._claim()
        self._active = GenerationStream(self, max_new_tokens, sampling, stops, close_session)
        self._active_thread = threading.get_ident()
        return self._active

    def check_settings(
        self,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> tuple[Sampling, list[str]]:
        """`generate`'s settings checked against this session (a clear error for a bad one), as the sampling
        and the stop strings a stream takes; a scheduler checks them so before it runs the session."""
        sampling = Sampling(temperature, top_p, seed)
        stops = inputs.stop_strings(stop)
        self.engine.check_lengths(len(self.tokens), max_new_tokens)
        return sampling, stops

    def extend(self, more: str | Sequence[int], *, chat: bool = False, defer: bool = False) -> None:
        """Append a turn (text or token ids); only tokens without KV are computed, the earlier ones are reused.

        With `chat=True` the text is a user message: the conversation is rendered with the chat template and
        the part after the session's tokens is appended (the session must have been started with `chat=True`).
        With `defer=True` the turn's pass waits for `advance_prefill`, as a deferred prefill does (a scheduler
        then runs it between other sequences' decode steps).
        """
        self._claim()
        new = self._turn_ids(more, chat)
        self.engine.check_lengths(len(self.tokens) + len(new), 1)
        ids = self.tokens[self.computed :] + new
        task = self.engine.executor.start_extend(self, ids, self.computed, self.chunk)
        self.tokens.extend(new)
        self._begin(task, defer)

    def advance_prefill(self, layers: int) -> bool:
        """Run up to `layers` more layers of a prompt pass deferred by `Engine.start(..., defer_prefill=True)`
        or `extend(..., defer=True)`; True once it is done (then the session is ready to generate). A
        scheduler calls this between decode steps, so that a long prompt does not stall the sequences
        already decoding. A pass shared with other sessions (`prefill_together`) advances for all of them;
        `layers=0` runs nothing, it only collects a pass that others finished (and starts none)."""
        self._check_open()
        if self._unstarted is not None:
            if layers == 0:
                return False
            prefill_together([self])
        if self._prefill is None:
            return True
        task = self._prefill
        if task.result is None and layers > 0:
            start = time.perf_counter()
            self.engine.executor.advance(task, layers)
            self._synchronize()
            task.seconds += time.perf_counter() - start
        if task.result is None:
            return False
        (logits, record), tokens = task.result[self._slot], task.computed[self._slot] - self.computed
        self._prefill = None
        record.seconds = task.seconds
        self._prompt_done(logits, record, tokens)
        return True

    def fork(self) -> Session:
        """A second session with this one's whole state: the same tokens, KV and method decisions so far,
        copied, not recomputed. Each then goes its own way: several answers to one prompt, or many
        continuations of one long context prefilled once."""
        self._check_open()
        if self.prefilling or self._active is not None:
            raise RuntimeError("fork a session between calls: its prompt pass or a generation is under way")
        state = self.engine.executor.fork(self)
        twin = copy.copy(self)  # the settings; every piece of per-sequence state is replaced below
        twin.key, twin.policy, twin.kv = state.key, state.policy, state.kv
        twin.tokens, twin.calls = list(self.tokens), list(self.calls)
        twin.messages = copy.deepcopy(self.messages)
        twin._prompt_pass = copy.deepcopy(self._prompt_pass)
        twin._logits = None if self._logits is None else self._logits.clone()
        return twin

    def park(self) -> None:
        """Move this session's KV to host memory (its policy's small state stays); the next call brings it
        back by itself. What a server does with a conversation it keeps but has no room for on the device."""
        self._check_open()
        for layer in self.kv:
            layer.move_to(torch.device("cpu"))

    @property
    def prefilling(self) -> bool:
        """A deferred prompt pass (a prefill or an extension) is still under way."""
        return self._prefill is not None or self._unstarted is not None

    @property
    def prefill_started(self) -> bool:
        """A deferred prompt pass has run some of its layers (or been set up with others: `prefill_together`)."""
        return self._prefill is not None

    @property
    def pending_tokens(self) -> int:
        """Tokens the prompt pass under way computes, those of the prompts prefilled beside this one's
        included (0 when none is under way)."""
        if self._unstarted is not None:
            return len(self._unstarted)
        if self._prefill is None:
            return 0
        task = self._prefill
        return sum(task.computed) - sum(seq.computed for seq in task.seqs)

    @property
    def stats(self) -> SessionStats:
        stats = Stats(method={})
        if self.kv is not None:
            self.fill_memory_stats(stats)
        return SessionStats(
            list(self.calls), self.computed, stats.kv_bytes_device, stats.kv_bytes_host, stats.kv_bytes_reserved
        )

    def close(self) -> None:
        """Free the session's KV and policy state now; later calls are an error. (A prefill shared with other
        sessions still computes this one's rows to its end, then lets them go.)"""
        self.kv = None
        self.policy = None
        self._logits = None
        self._prefill = self._unstarted = None

    @property
    def closed(self) -> bool:
        return self.kv is None

    # -- for GenerationStream and the engine -----------------------------------------------------------
    def next_logits(self, counts: loop.DecodeCounts) -> torch.Tensor:
        """Logits after the last token, decoding it first if it has no KV yet."""
        request = self.decode_request(counts)
        if request is None:
            logits, self._logits = self._logits, None
            return logits
        logits = self.engine.executor.decode([request])[0]
        self.decoded()
        return logits

    def decode_request(self, counts: loop.DecodeCounts) -> loop.DecodeRequest | None:
        """The decode step the next logits need (the last token has no KV yet), or None when they are ready.

        A scheduler runs the requests of many sessions as one batched step, then calls `decoded`.
        """
        if self._logits is not None:
            return None
        self._check_open()
        if self.computed != len(self.tokens) - 1:
            raise RuntimeError(f"{len(self.tokens) - self.computed} tokens lack KV; a decode step computes one")
        return loop.DecodeRequest(self.key, self.policy, self.kv, self.tokens[-1], self.computed, counts)

    def decoded(self) -> None:
        """The request of `decode_request` ran: the last token has its KV."""
        self.computed += 1

    @property
    def device_bytes(self) -> int:
        """KV (and policy state) this session holds on the device now: what memory admission counts."""
        return 0 if self.kv is None else self._kv_bytes(on_device=True) + self.policy.device_bytes()

    def take_prompt_pass(self) -> loop.PromptPass | None:
        record, self._prompt_pass = self._prompt_pass, None
        return record

    def fill_memory_stats(self, stats: Stats) -> None:
        kv, policy = self.kv, self.policy
        extra = policy.device_bytes()
        stats.kv_bytes_device = self._kv_bytes(on_device=True) + extra
        stats.kv_bytes_reserved = sum(layer.reserved_bytes for layer in kv) + extra
        stats.kv_bytes_host = policy.host_bytes() + self._kv_bytes(on_device=False)
        stats.host_is_device = self.engine.model.device.type == "cpu"
        stats.method_stats = policy.stats()

    def call_done(self, generation: Generation) -> None:
        self.calls.append(generation.stats)
        if self.messages is not None:
            self.messages.append({"role": "assistant", "content": generation.text})
        self._active = None

    # -- helpers ---------------------------------------------------------------------------------------
    def _begin(self, task: PromptTask, defer: bool) -> None:
        """Take `task` (this session's alone) as its prompt pass; run it now unless deferred."""
        self._prefill, self._slot = task, 0
        if not defer:
            self.advance_prefill(self.engine.model.spec.num_layers)

    def _kv_bytes(self, on_device: bool) -> int:
        """Bytes of the KV on the model's device, or elsewhere (parked in host memory)."""
        device = self.engine.model.device
        return sum(layer.nbytes for layer in self.kv if (layer.device == device) == on_device)

    def _synchronize(self) -> None:
        """Wait for the device, so that a prompt's time is its compute (CUDA runs asynchronously)."""
        if self.engine.model.device.type == "cuda":
            torch.cuda.synchronize(self.engine.model.device)

    def _prompt_done(self, logits: torch.Tensor, record: loop.PromptPass, tokens: int) -> None:
        if self._prompt_pass is not None:  # two turns with no generation between them: report both
            record = self._prompt_pass.then(record)
        self._logits, self._prompt_pass = logits, record
        self.computed += tokens

    def _turn_ids(self, more: str | Sequence[int], chat: bool) -> list[int]:
        if not chat:
            return self.engine.encode(more, special_tokens=False)
        if self.messages is None:
            raise ValueError("chat=True extends a chat session, and this one was started with chat=False")
        if not isinstance(more, str):
            raise ValueError("chat=True takes the user's message as text, not token ids")
        messages = [*self.messages, {"role": "user", "content": more}]
        rendered = self.engine.render_chat(messages)
        if rendered[: len(self.tokens)] != self.tokens:
            raise ValueError(
                "the chat template renders this conversation with other tokens than the session holds (a reply "
                "cut by a stop string or by max_new_tokens renders differently); extend with token ids instead"
            )
        self.messages = messages
        return rendered[len(self.tokens) :]

    def _claim(self) -> None:
        """A new call cancels this thread's unfinished stream of the session; another thread's is an error."""
        self._check_open()
        if self.prefilling:
            raise RuntimeError(
                "this session's prefill is still under way (a deferred prompt or turn): "
                "finish it with advance_prefill first"
            )
        for layer in self.kv:  # a parked session's KV comes back to the device
            layer.move_to(self.engine.model.device)
        active = self._active
        if active is None:
            return
        if self._active_thread != threading.get_ident():
            raise RuntimeError(
                "this session is generating in another thread: one session serves one caller at a time "
                "(start a session per conversation; sessions of one engine may run in any threads)"
            )
        active.close()

    def _check_open(self) -> None:
        if self.kv is None:
            raise RuntimeError("this session is closed: start a new one with engine.start(...)")


def prefill_together(sessions: Sequence[Session]) -> None:
    """Set up one prefill for the deferred first prompts of `sessions` (none started yet, all with the same
    `prefill_chunk`): their rows go through the projections and the MLP together, attention and the
    policies' decisions per session, so each gets exactly what it gets alone. Each session then advances
    the shared pass with `advance_prefill` (what one runs, all have run)."""
    if not sessions:
        return
    if any(session._unstarted is None for session in sessions):
        raise ValueError("prefill_together takes sessions whose deferred prefill has not started")
    if len({session.chunk for session in sessions}) > 1:
        raise ValueError("sessions prefilled together need the same prefill_chunk")
    prompts = [session._unstarted for session in sessions]
    task = sessions[0].engine.executor.start_prefill(list(sessions), prompts, sessions[0].chunk)
    for slot, session in enumerate(sessions):
        session._prefill, session._slot, session._unstarted = task, slot, None
