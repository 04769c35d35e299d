"""Methods: one file each, a small settings dataclass and the policy it starts for a generation."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import fields

from .base import Context, Dense, LayerStep, Method, Policy, Rows, Run, resolve_budget, scaled_layers
from .compose import Compose
from .h2o import H2O
from .lazyllm import LazyLLM
from .omnikv import OmniKV
from .sliminfer import SlimInfer
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Dense, LazyLLM, OmniKV, StreamingLLM, SnapKV, H2O, SlimInfer)
}

SPEC = re.compile(r"\s*(?P<name>[^\s()]+)\s*(?:\((?P<args>.*)\))?\s*", re.DOTALL)  # name, or name(settings)


def resolve_method(method: str | Method, defaults: Mapping[str, Method] | None = None) -> Method:
    """A method from an instance (returned as is), a name ("sliminfer") or a call-like spec with settings,
    e.g. "sliminfer(budgets=(0.25, 0.125, 0.0625), gamma=0.8)" (keyword arguments, Python literals only).

    `defaults` (see `check_method_defaults`): the settings a bare name stands for on one model, e.g. a schedule
    measured on it; a spec with settings starts from the class's own defaults (the papers'), as everywhere.
    """
    if isinstance(method, Method):
        return method
    if not isinstance(method, str):
        raise TypeError(f"a method is a name, a spec string or a Method instance, got {type(method).__name__}")
    sides = _top_level_parts(method, "+")
    if len(sides) > 2:
        raise ValueError(f"bad method spec {method!r}: a composition is one prefill method + one decode method")
    if len(sides) == 2:
        return Compose(resolve_method(sides[0], defaults), resolve_method(sides[1], defaults))
    spec = SPEC.fullmatch(method)
    if spec is None:
        raise ValueError(f"bad method spec {method!r}: write a name, or name(key=value, ...) with Python literals")
    name, args = spec.group("name"), spec.group("args")
    cls = METHODS.get(name.lower())
    if cls is None:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown method {name!r}: choose one of {known} or pass a Method instance")
    if not args:
        return (defaults or {}).get(cls.name) or cls()
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        if call.args:
            raise ValueError("settings must be keyword arguments")
        settings = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as err:
        hint = "write name(key=value, ...) with Python literals"
        raise ValueError(f"bad method spec {method!r}: {hint} ({err})") from err
    try:
        return cls(**settings)
    except TypeError as err:
        raise ValueError(f"bad settings for {cls.name}: {err}") from err


def spec_of(method: Method) -> str:
    """The spec `resolve_method` reads back as `method` (on an engine without method defaults): its name and
    the settings that differ from its class's defaults, e.g. "sliminfer(prune_layers=(23,), budgets=(0.25,))"."""
    if isinstance(method, Compose):
        return f"{spec_of(method.prefill)}+{spec_of(method.decode)}"
    default = type(method)()
    changed = [f.name for f in fields(method) if f.init and getattr(method, f.name) != getattr(default, f.name)]
    args = ", ".join(f"{name}={getattr(method, name)!r}" for name in changed)
    return f"{method.name}({args})" if args else method.name


def check_method_defaults(settings: Mapping[str, str | Method] | None) -> dict[str, Method]:
    """Per-model settings of bare method names, checked: `{"sliminfer": "sliminfer(prune_layers=(23,),
    budgets=(0.25,))", ...}` (specs or instances), each a registered name mapped to a setting of that method
    (a composition is not a default of one method). None or `{}`: the classes' own defaults."""
    checked: dict[str, Method] = {}
    for name, setting in (settings or {}).items():
        if name not in METHODS:
            known = ", ".join(sorted(METHODS))
            raise ValueError(f"method default for {name!r}: not a method name; choose one of {known}")
        try:
            method = resolve_method(setting)
        except (ValueError, TypeError) as err:
            raise ValueError(f"method default for {name!r}: {err}") from err
        if type(method) is not METHODS[name]:
            raise ValueError(f"method default for {name!r} is a {method.name} setting ({setting!r}): give a {name} one")
        checked[name] = method
    return checked


def split_methods(text: str) -> list[str]:
    """Comma-separated method specs, where commas inside parentheses belong to a spec's settings;
    'all' is every registered method with its defaults, in name order."""
    if text.strip().lower() == "all":
        return sorted(METHODS)
    return [spec for spec in _top_level_parts(text, ",") if spec]


def _top_level_parts(text: str, separator: str) -> list[str]:
    """`text` split at `separator`s outside parentheses (those inside belong to a spec's settings)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return parts


__all__ = [
    "METHODS",
    "Compose",
    "Context",
    "Dense",
    "H2O",
    "LayerStep",
    "LazyLLM",
    "Method",
    "OmniKV",
    "Policy",
    "Rows",
    "Run",
    "SlimInfer",
    "SnapKV",
    "StreamingLLM",
    "check_method_defaults",
    "resolve_budget",
    "resolve_method",
    "scaled_layers",
    "spec_of",
    "split_methods",
]
