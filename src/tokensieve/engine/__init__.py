"""The engine: the layer loop (`loop`), sessions that keep a conversation's state (`session`), one generation
call token by token (`stream`), continuous batching of many (`scheduler`), and the `Engine` (`core`)."""

from .core import Engine
from .scheduler import Scheduler
from .session import Session, SessionStats, prefill_together
from .stream import GenerationStream

__all__ = ["Engine", "GenerationStream", "Scheduler", "Session", "SessionStats", "prefill_together"]
