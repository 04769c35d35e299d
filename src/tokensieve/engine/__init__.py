"""The engine: the layer loop (`loop`), sessions that keep a conversation's state (`session`), one generation
call token by token (`stream`), and the `Engine` that starts them (`core`)."""

from .core import Engine
from .session import Session, SessionStats
from .stream import GenerationStream

__all__ = ["Engine", "GenerationStream", "Session", "SessionStats"]
