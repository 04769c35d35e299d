"""tokensieve: long-context LLM inference that computes only the tokens that matter."""

from .engine import Engine, GenerationStream, Scheduler, Session, SessionStats
from .generation import Generation, Stats
from .loading import load
from .methods import METHODS, Method

__version__ = "0.1.0"
__all__ = [
    "METHODS",
    "Engine",
    "Generation",
    "GenerationStream",
    "Method",
    "Scheduler",
    "Session",
    "SessionStats",
    "Stats",
    "load",
    "__version__",
]
