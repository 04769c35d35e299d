"""The request queue: one bounded queue and one worker thread that runs the requests with continuous batching.

The thread admits queued requests while fewer than `--max-running` run (each opens or reuses a session,
prefilling its new tokens), then runs one decode step for every running request at once (the engine's
`Scheduler`: one pass through the projections and the MLP, attention per sequence), and retires the
finished ones between steps. The HTTP side never blocks on the engine: the worker hands each request's
text pieces to the request's asyncio queue through its event loop.
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

from ..engine import Scheduler
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
    session: Any = field(default=None, repr=False)  # once admitted: its session and stream

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
        host_bytes = config.host_bytes_for(engine.model.device)
        # touched by the worker thread only
        self.sessions = SessionPool(engine, config.session_bytes, metrics, host_bytes)
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # scheduler index -> job; touched under the condition's lock
        self._scheduler = Scheduler(engine, max_batch=config.max_running)
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="tokensieve-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def batch_stats(self):
        """The batch size and duration of every decode step so far (`engine.scheduler.BatchStats`)."""
        return self._scheduler.stats

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
            for job in self._running.values():
                job.stop_error = shutdown
                job.cancelled.set()
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    # -- the thread ------------------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._stopped:
                    self._cond.wait()
                if self._stopped and not self._running:
                    self.sessions.close()
                    return
                room = max(0, self.config.max_running - len(self._running))
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            for job in admitted:
                self._guarded([job], self._admit, job)
            self._interrupt()
            jobs = list(self._running.values())
            pieces = self._guarded(jobs, self._scheduler.step) or []
            for index, piece in pieces:
                self._running[index].emit("piece", piece)
            self._retire()
            with self._cond:
                self._gauges()
                self._cond.notify_all()

    def _guarded(self, jobs: list[Job], work, *args):
        """Run `work`; a bug fails these jobs with a 500, never the worker thread."""
        try:
            return work(*args)
        except Exception as err:
            log.exception("generation failed")
            for job in jobs:
                self._drop(job, ServeError(500, f"generation failed: {type(err).__name__}: {err}"))
            return None

    def _admit(self, job: Job) -> None:
        stopped = job.interruption()
        if stopped is not False:
            if stopped is not None:
                job.emit("error", stopped)
            return
        try:  # the prefill runs here: a method whose settings do not fit this prompt fails now
            job.session = self.sessions.open(job.prompt, job.method, job.reuse)
            index = self._scheduler.add(job.session, max_new_tokens=job.max_tokens, **job.sampling)
        except (ValueError, TypeError) as err:
            if job.session is not None:
                job.session.close()
            job.emit("error", ServeError(422, f"bad settings: {err}", "tokensieve.method"))
            return
        with self._cond:
            self._running[index] = job

    def _interrupt(self) -> None:
        """Stop the running requests whose client left, whose timeout passed, or that the shutdown ends."""
        for job in list(self._running.values()):
            stopped = job.interruption()
            if stopped is not False:
                self.metrics.cancelled.inc()
                self._drop(job, stopped)

    def _drop(self, job: Job, error: ServeError | None) -> None:
        """End `job` now: its generation stops, its session is freed, its client hears `error` (if any)."""
        with self._cond:
            index = next((i for i, j in self._running.items() if j is job), None)
            if index is not None:
                del self._running[index]
        if index is not None:
            self._scheduler.cancel(index)
            self._scheduler.done.pop(index, None)
        if job.session is not None:
            job.session.close()
        if error is not None:
            job.emit("error", error)

    def _retire(self) -> None:
        for index in [i for i in self._running if i in self._scheduler.done]:
            with self._cond:
                job = self._running.pop(index)
            generation = self._scheduler.done.pop(index)
            try:  # failing to retain a session must not fail a finished response, nor stop this thread
                if job.reuse:
                    self.sessions.keep(job.session, job.method, job.prompt, generation)
                else:  # a request that asks for no reuse leaves nothing to reuse, nor evicts what others left
                    job.session.close()
            except Exception:
                log.exception("could not retain a finished request's session; it is closed")
                job.session.close()
            self.metrics.finished(generation, time.monotonic() - job.arrived)
            job.emit("done", generation)

    def _gauges(self) -> None:
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.running.set(len(self._running))
