"""Continuous batching: many generations share each decode step; they join and leave between steps.

`Scheduler.submit` queues a request; every `step()` first admits waiting requests while the batch has a
place and the KV budget allows, advances the prefill of the oldest admitted one by a quantum of layers
(about `prefill_tokens` prompt tokens through every layer; the whole prefill when no sequence is decoding),
so that a long prompt does not stall the running sequences for its whole prefill, then runs one decode
step for every running sequence at once (`loop.decode_batch`: one pass through the projections and the
MLP, attention per sequence over its own selection) and retires the sequences that finished, freeing
their place at once.

Memory admission counts what each running session really holds on the device (`Session.device_bytes`)
and charges a waiting request its prompt's dense KV (an upper bound for every method); a request whose
prompt alone exceeds `max_kv_bytes` is refused at `submit`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..generation import Generation
from .session import prefill_together
from .stream import GenerationStream

PREFILL_TOKENS = 2048  # prefill work between two decode steps: about this many prompt tokens through every layer


@dataclass
class Request:
    """One submitted generation: its prompt ids and settings, and its stream once admitted."""

    index: int
    ids: list[int]
    start: dict[str, Any]
    generate: dict[str, Any]
    kv_bytes: int
    session: Any = None  # once admitted
    stream: GenerationStream | None = None
    owned: bool = True  # the scheduler started the session, and closes it when the generation ends


@dataclass
class BatchStats:
    """Batch-level figures: the batch size of each decode step and the tokens it produced per second, and
    how many first prompts each prefill pass computed together."""

    batch_sizes: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    prefill_batch_sizes: list[int] = field(default_factory=list)  # first prompts prefilled in each joint pass

    @property
    def tokens_per_s(self) -> float:
        return sum(self.batch_sizes) / max(1e-9, sum(self.step_seconds))


class Scheduler:
    """Continuous batching over one engine (see the module docstring). `max_batch`: sequences per decode
    step (those prefilling count); `max_kv_bytes`: device KV of all running sequences (None: no limit);
    `prefill_tokens`: the prefill work done between two decode steps, in prompt tokens through every layer."""

    def __init__(
        self, engine, max_batch: int = 8, max_kv_bytes: int | None = None, prefill_tokens: int = PREFILL_TOKENS
    ):
        for name, value in (("max_batch", max_batch), ("prefill_tokens", prefill_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if max_kv_bytes is not None and (not isinstance(max_kv_bytes, int) or max_kv_bytes < 1):
            raise ValueError(f"max_kv_bytes must be None or an int >= 1 (bytes), got {max_kv_bytes!r}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_kv_bytes = max_kv_bytes
        self.prefill_tokens = prefill_tokens
        self.waiting: deque[Request] = deque()
        self.prefilling: dict[int, Request] = {}  # admitted, prefill under way (oldest first)
        self.running: dict[int, Request] = {}
        self.done: dict[int, Generation] = {}
        self.stats = BatchStats()
        self._next = 0

    def submit(
        self,
        prompt: str | Sequence[int],
        *,
        method=None,
        chat: bool = False,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> int:
        """Queue a generation; returns its index. Bad input is an error now, before any work."""
        ids = self.engine.render_chat([{"role": "user", "content": prompt}]) if chat else self.engine.encode(prompt)
        self.engine.check_lengths(len(ids), max_new_tokens)
        spec = self.engine.model.spec
        kv_bytes = len(ids) * spec.num_layers * spec.kv_bytes_per_token(self.engine.model.dtype)
        if self.max_kv_bytes is not None and kv_bytes > self.max_kv_bytes:
            raise ValueError(
                f"its {len(ids)}-token prompt needs up to {kv_bytes} bytes of KV, more than "
                f"max_kv_bytes={self.max_kv_bytes} even alone: shorten it or raise the budget"
            )
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        request = Request(self._next, ids, {"method": method}, sampling, kv_bytes)
        self.waiting.append(request)
        self._next += 1
        return request.index

    def add(self, session, **generate) -> int:
        """Generate on a session its caller opened from the next step, outside the admission queue; a session
        whose prompt pass was deferred (`engine.start(..., defer_prefill=True)`, `session.extend(..., defer=True)`:
        a fresh request, a server's retained conversation) has it run between decode steps first.
        `generate`: `session.stream`'s settings. Returns its index."""
        session.check_settings(**generate)  # bad settings fail here, not in a later step
        request = Request(self._next, list(session.tokens), {}, generate, 0, session, owned=False)
        self._next += 1
        if session.prefilling:
            self.prefilling[request.index] = request
        else:
            request.stream = session.stream(**generate)
            self.running[request.index] = request
        return request.index

    def cancel(self, index: int) -> None:
        """Stop request `index` now (waiting or running); its place and memory are freed."""
        self.waiting = deque(r for r in self.waiting if r.index != index)
        prefilling = self.prefilling.pop(index, None)
        if prefilling is not None:  # like a waiting one, it ends with no generation
            prefilling.session.close()
        request = self.running.pop(index, None)
        if request is not None:
            request.stream.close()
            self.done[index] = request.stream.generation

    @property
    def finished(self) -> bool:
        return not self.waiting and not self.prefilling and not self.running

    def step(self) -> list[tuple[int, str]]:
        """Admit what fits, advance a prefill, then one decode step for every running sequence; returns
        `(index, piece)` pairs."""
        self._admit()
        self._advance_prefill()
        pending = [(r, r.stream.decode_request()) for r in self.running.values()]
        # A stream just admitted has its first logits from the prefill: it takes them, no decode needed.
        pieces = [(r.index, r.stream.take(None, 0.0)) for r, request in pending if request is None]
        ready = [r for r, request in pending if request is not None]
        if ready:
            start = time.perf_counter()
            batch = [request for _, request in pending if request is not None]
            logits = self.engine.executor.decode(batch)
            seconds = time.perf_counter() - start
            self.stats.batch_sizes.append(len(ready))
            self.stats.step_seconds.append(seconds)
            pieces += [(r.index, r.stream.take(row, seconds)) for r, row in zip(ready, logits, strict=True)]
        self._retire()
        if not self.running:  # the batch ended: its KV slots go (a new batch finds its own)
            self.engine.executor.release_slots()
        return [(index, piece) for index, piece in pieces if piece]

    def run(self) -> list[Generation]:
        """Step until every request is done; the generations in submission order."""
        while not self.finished:
            self.step()
        return [self.done[i] for i in sorted(self.done)]

    def _admit(self) -> None:
        while self.waiting and self._places_taken() < self.max_batch and self._fits(self.waiting[0]):
            request = self.waiting.popleft()
            request.session = self.engine.start(request.ids, defer_prefill=True, **request.start)
            self.prefilling[request.index] = request

    def _advance_prefill(self) -> None:
        """The oldest prefill by a quantum of layers (all of them when nothing decodes); done, it runs.

        A first prompt not yet started takes the other waiting ones beside it into one pass while their
        tokens fit `prefill_tokens` (short prompts share the weights' reads; a long one runs alone, so it
        delays no short one's first token)."""
        if not self.prefilling:
            return
        oldest = next(iter(self.prefilling.values())).session
        if not oldest.prefill_started:
            group = self._prefill_group(oldest)
            prefill_together(group)
            self.stats.prefill_batch_sizes.append(len(group))
        layers = self.engine.model.spec.num_layers
        quantum = max(1, self.prefill_tokens * layers // oldest.pending_tokens) if self.running else layers
        oldest.advance_prefill(quantum)
        for index, request in list(self.prefilling.items()):
            if request.session.advance_prefill(0):  # done, or done beside the oldest (collected here)
                del self.prefilling[index]
                request.stream = request.session.stream(**request.generate, close_session=request.owned)
                self.running[index] = request

    def _prefill_group(self, oldest) -> list:
        """`oldest`, and after it the waiting first prompts that fit beside it in `prefill_tokens` tokens."""
        group, tokens = [oldest], oldest.pending_tokens
        for request in self.prefilling.values():
            session = request.session
            if session is oldest or session.prefill_started or session.chunk != oldest.chunk:
                continue
            if tokens + session.pending_tokens <= self.prefill_tokens:
                group.append(session)
                tokens += session.pending_tokens
        return group

    def _places_taken(self) -> int:
        return len(self.running) + len(self.prefilling)

    def _fits(self, request: Request) -> bool:
        if self.max_kv_bytes is None or not self._places_taken():
            return True
        held = sum(r.stream.session.device_bytes for r in self.running.values())
        held += sum(r.kv_bytes for r in self.prefilling.values())  # charged their dense KV until they run
        held += self.engine.executor.pool.padding_bytes  # the dense sequences' slots beyond their entries
        return held + request.kv_bytes <= self.max_kv_bytes

    def _retire(self) -> None:
        for index in [i for i, r in self.running.items() if r.stream.generation is not None]:
            self.done[index] = self.running.pop(index).stream.generation


class BatchStream(Iterator[tuple[int, str]]):
    """`(index, piece)` pairs of a batch as it decodes; `generations` (one per prompt, in order) once done."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.generations: list[Generation] | None = None
        self._pieces: deque[tuple[int, str]] = deque()

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[int, str]:
        while not self._pieces and not self.scheduler.finished:
            self._pieces.extend(self.scheduler.step())
        if self._pieces:
            return self._pieces.popleft()
        if self.generations is None:
            self.generations = [self.scheduler.done[i] for i in sorted(self.scheduler.done)]
        raise StopIteration
