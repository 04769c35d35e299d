"""The request queue: one bounded queue, one worker thread that runs the generations one at a time.

The engine runs one generation at a time anyway (its calls are serialized); the continuous-batching
scheduler of issue 12 will replace this thread. The HTTP side never blocks on the engine: the worker
hands each request's text pieces to the request's asyncio queue through its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..methods import Method
from .config import ServeConfig
from .errors import ServeError
from .metrics import Metrics
from .prompts import Prompt
from .sessions import SessionPool

log = logging.getLogger("tokensieve.serve")


@dataclass(eq=False)  # a job is itself: the queue finds and removes it by identity
class Job:
    """One request on its way through the queue. Events: ("piece", str), ("done", Generation), ("error", ServeError)."""

    prompt: Prompt
    method: Method
    max_tokens: int
    sampling: dict[str, Any]  # temperature, top_p, seed, stop
    reuse: bool
    deadline: float  # time.monotonic() after which the request is abandoned (504)
    loop: asyncio.AbstractEventLoop = field(repr=False)
    events: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_error: ServeError | None = None  # why the server (not the client) stopped it

    def emit(self, kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (server stopped): nobody listens
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def interruption(self) -> ServeError | None | bool:
        """False to go on; otherwise the error to report (None: the client left, nobody to tell)."""
        if self.cancelled.is_set():
            return self.stop_error
        if time.monotonic() > self.deadline:
            return ServeError(504, "the request exceeded the server's --request-timeout and was stopped")
        return False


class Worker:
    """Owns the queue and the thread; `submit` refuses with 429 (queue full) or 503 (shutting down)."""

    def __init__(self, engine, config: ServeConfig, metrics: Metrics):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.sessions = SessionPool(engine, config.session_bytes, metrics)  # touched by the worker thread only
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="tokensieve-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def closing(self) -> bool:
        return self._closing

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise ServeError(503, "the server is shutting down: retry on another instance or later")
            if len(self._waiting) >= self.config.max_waiting:
                raise ServeError(
                    429, f"the queue is full ({self.config.max_waiting} requests waiting, --max-waiting): retry later"
                )
            self._waiting.append(job)
            self._gauges()
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job from the queue, or stop its generation at the next piece."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._gauges()

    def close(self) -> None:
        """Refuse new requests (503); what is queued and running goes on."""
        with self._cond:
            self._closing = True

    def stop(self) -> None:
        """Graceful shutdown: let queued and running requests finish within the grace period, then stop
        the rest with a 503 error event (a complete response), and end the thread."""
        self.close()
        end = time.monotonic() + self.config.shutdown_grace_s
        with self._cond:
            while (self._waiting or self._running) and time.monotonic() < end:
                self._cond.wait(timeout=max(0.0, end - time.monotonic()))
            shutdown = ServeError(503, "the server shut down before this request finished")
            for job in self._waiting:
                job.emit("error", shutdown)
            self._waiting.clear()
            if self._running is not None:
                self._running.stop_error = shutdown
                self._running.cancelled.set()
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    # -- the thread ------------------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    self.sessions.close()
                    return
                job = self._running = self._waiting.popleft()
                self._gauges()
            try:
                self._run(job)
            except Exception as err:  # a bug must fail one request, never the worker thread
                log.exception("generation failed")
                job.emit("error", ServeError(500, f"generation failed: {type(err).__name__}: {err}"))
            finally:
                with self._cond:
                    self._running = None
                    self._gauges()
                    self._cond.notify_all()

    def _run(self, job: Job) -> None:
        stopped = job.interruption()
        if stopped is not False:
            if stopped is not None:
                job.emit("error", stopped)
            return
        session = None
        try:  # the prefill runs here: a method whose settings do not fit this prompt fails now
            session = self.sessions.open(job.prompt, job.method, job.reuse)
            stream = session.stream(max_new_tokens=job.max_tokens, **job.sampling)
        except (ValueError, TypeError) as err:
            if session is not None:
                session.close()
            job.emit("error", ServeError(422, f"bad settings: {err}", "tokensieve.method"))
            return
        try:
            for piece in stream:
                stopped = job.interruption()
                if stopped is not False:  # the client left, the timeout passed or the server stops
                    stream.close()
                    session.close()
                    self.metrics.cancelled.inc()
                    if stopped is not None:
                        job.emit("error", stopped)
                    return
                job.emit("piece", piece)
        except BaseException:
            session.close()
            raise
        generation = stream.generation
        self.sessions.keep(session, job.method, job.prompt, generation)
        self.metrics.finished(generation, time.monotonic() - job.arrived)
        job.emit("done", generation)

    def _gauges(self) -> None:
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.running.set(0 if self._running is None else 1)
