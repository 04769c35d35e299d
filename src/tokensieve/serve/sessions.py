"""Retained sessions: a conversation's KV kept between requests, so that the next turn computes only itself.

After a request, its session is kept with the conversation's text so far (prompt + reply). A later request
whose text starts with that text (the usual chat: the previous messages, the reply, a new user message)
continues the session: only the new suffix is tokenized and computed (`session.extend`). A token-id prompt
continues a session whose `tokens` it starts with. A session is used by one request at a time: it leaves the
pool while it runs.

Two memory caps, least recently used first: past `max_bytes` (the KV the active sessions hold, on the device
and what their methods keep on the host) the oldest sessions are parked (their KV moved to host memory,
`Session.park`; it comes back when the conversation continues), and past `host_bytes` of parked KV the
oldest are dropped. With `host_bytes=0` (the default on a CPU, where host memory is the device's) a
session past `max_bytes` is dropped at once, as without parking.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..generation import Generation
from ..methods import Method
from .metrics import Metrics
from .prompts import Prompt, encode_piece


@dataclass
class _Retained:
    session: Any
    method: Method
    text: str | None  # the conversation's text so far; None when it began as token ids
    chat: bool  # a chat's text is tokenized without the tokenizer's special tokens, a completion's with them
    parked: bool = False  # its KV waits in host memory
    # What it holds, measured once when kept (a retained session does not change): its KV and policy state
    # on the device, and what its method keeps in host memory.
    device_bytes: int = field(init=False)
    host_bytes: int = field(init=False)

    def __post_init__(self):
        stats = self.session.stats
        self.device_bytes, self.host_bytes = stats.kv_bytes_device, stats.kv_bytes_host

    @property
    def nbytes(self) -> int:
        return self.device_bytes + self.host_bytes


class SessionPool:
    """Sessions kept for prefix reuse, least recently used first, within `max_bytes` of KV (0: none kept)."""

    def __init__(self, engine, max_bytes: int, metrics: Metrics, host_bytes: int = 0):
        self.engine = engine
        self.max_bytes = max_bytes
        self.host_bytes = host_bytes
        self.metrics = metrics
        self._kept: OrderedDict[int, _Retained] = OrderedDict()  # by id(session), oldest first

    def open(self, prompt: Prompt, method: Method, reuse: bool):
        """The retained session this prompt continues (extended by its new tokens), else a fresh one."""
        found = self._take(prompt, method) if reuse else None
        if found is None:
            self.metrics.reuse.labels("miss").inc()
            return self.engine.start(prompt.ids, method=method, defer_prefill=True)  # the scheduler runs it
        retained, suffix = found
        try:
            if suffix:  # its pass runs in the scheduler, between the other requests' decode steps
                retained.session.extend(suffix, defer=True)
        except BaseException:
            retained.session.close()
            raise
        self.metrics.reuse.labels("hit").inc()
        return retained.session

    def keep(self, session, method: Method, prompt: Prompt, generation: Generation) -> None:
        """Retain a finished request's session (closing what no longer fits), or close it when the returned
        text does not show every generated token (cut at a stop string, or a trailing incomplete character
        dropped): a client continuing that text would continue other tokens than the session holds. (A
        token-id conversation is matched on ids, so it is kept either way.)"""
        shown = self.engine.tokenizer.decode(generation.token_ids, skip_special_tokens=True) == generation.text
        if self.max_bytes == 0 or (prompt.text is not None and not shown):
            session.close()
            return
        text = None
        if prompt.text is not None:
            text = prompt.text + generation.text
            if generation.finish_reason == "eos":  # the EOS token is in the session: templates render it too
                text += self.engine.tokenizer.decode(session.tokens[-1:], skip_special_tokens=False)
        self._kept[id(session)] = _Retained(session, method, text, prompt.chat)
        self._evict()

    def close(self) -> None:
        for retained in self._kept.values():
            retained.session.close()
        self._kept.clear()
        self._gauges()

    # -- internals -------------------------------------------------------------------------------------
    def _take(self, prompt: Prompt, method: Method) -> tuple[_Retained, list[int]] | None:
        """The retained session with the longest conversation that this prompt continues, removed from
        the pool, with the token ids still to compute."""
        best, best_len = None, -1
        for key, retained in self._kept.items():
            if retained.method != method or retained.chat != prompt.chat:
                continue
            if prompt.text is not None and retained.text is not None:
                if prompt.text.startswith(retained.text) and len(retained.text) > best_len:
                    best, best_len = key, len(retained.text)
            elif prompt.text is None:
                tokens = retained.session.tokens
                if len(tokens) <= len(prompt.ids) and prompt.ids[: len(tokens)] == tokens and len(tokens) > best_len:
                    best, best_len = key, len(tokens)
        if best is None:
            return None
        retained = self._kept.pop(best)
        self._gauges()
        if prompt.text is not None:
            return retained, encode_piece(self.engine.tokenizer, prompt.text[len(retained.text) :])
        return retained, prompt.ids[len(retained.session.tokens) :]

    def _evict(self) -> None:
        """Park the least recently used sessions until the others fit in `max_bytes`, and drop the oldest
        parked ones until the parked fit in `host_bytes` (with no host room, drop instead of parking)."""
        while self._held(parked=False) > self.max_bytes:
            key, oldest = next((k, r) for k, r in self._kept.items() if not r.parked)
            if self.host_bytes == 0:
                self._drop(key)
                continue
            oldest.session.park()
            oldest.parked = True
            self.metrics.parked.inc()
        while self._held(parked=True) > self.host_bytes:
            self._drop(next(k for k, r in self._kept.items() if r.parked))
        self._gauges()

    def _drop(self, key: int) -> None:
        self._kept.pop(key).session.close()
        self.metrics.evicted.inc()

    def _held(self, parked: bool) -> int:
        """KV bytes (device and host, e.g. OmniKV's offloaded prompt) of the parked or of the other sessions,
        as measured when each was kept (measuring them all at every request is O(sessions x layers))."""
        return sum(r.nbytes for r in self._kept.values() if r.parked == parked)

    def _bytes(self) -> tuple[int, int]:
        """KV bytes of the retained sessions on the device and in host memory (a parked session's are all
        in host memory)."""
        device = sum(r.device_bytes for r in self._kept.values() if not r.parked)
        return device, sum(r.nbytes for r in self._kept.values()) - device

    def _gauges(self) -> None:
        device, host = self._bytes()
        self.metrics.kv_bytes.labels("device").set(device)
        self.metrics.kv_bytes.labels("host").set(host)
        self.metrics.retained.set(len(self._kept))
