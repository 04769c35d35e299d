"""Methods: one file each, a small settings dataclass and the policy it starts for a generation."""

from __future__ import annotations

from .base import Context, Dense, Method, Policy, Rows, Run, resolve_budget, scaled_layers
from .h2o import H2O
from .lazyllm import LazyLLM
from .omnikv import OmniKV
from .sliminfer import SlimInfer
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Dense, LazyLLM, OmniKV, StreamingLLM, SnapKV, H2O, SlimInfer)
}


def resolve_method(method: str | Method) -> Method:
    """A method instance from a name ("dense", "sliminfer", ...) or an instance (returned as is)."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method.lower() in METHODS:
        return METHODS[method.lower()]()
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(sorted(METHODS))} or pass a Method instance")


__all__ = [
    "METHODS",
    "Context",
    "Dense",
    "H2O",
    "LazyLLM",
    "Method",
    "OmniKV",
    "Policy",
    "Rows",
    "Run",
    "SlimInfer",
    "SnapKV",
    "StreamingLLM",
    "resolve_budget",
    "resolve_method",
    "scaled_layers",
]
