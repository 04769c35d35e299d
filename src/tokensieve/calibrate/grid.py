"""The candidate settings `calibrate-pruning` measures: a small default grid per method, placed by the
model's depth, or the user's own method specs (`--candidate`, `--grid`), checked before any run.

Only methods that prune the prompt's hidden states in prefill have a schedule to calibrate: SlimInfer
(blocks, after a layer's attention) and LazyLLM (tokens, after a layer). The methods that select or drop KV
(OmniKV, SnapKV, H2O, StreamingLLM) compute every prompt token in prefill.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..methods import METHODS, Compose, LazyLLM, Method, SlimInfer, resolve_method, spec_of

PRUNING_METHODS: dict[str, type[Method]] = {"sliminfer": SlimInfer, "lazyllm": LazyLLM}
QUESTION_WINDOW = 32  # query tokens that reach past a chat template's assistant header into the question

# (layers as fractions of the depth, or None for the paper's layers scaled; budgets; other settings).
# SlimInfer: its defaults (token counts: at a few thousand tokens they keep everything), the paper's layers
# at the fractions, later layers (where the model's own attention ranks the needle higher), and a
# query window that holds the question, not only the template's last tokens.
SLIMINFER_GRID = (
    (None, None, {}),
    (None, (0.5, 0.25, 0.125), {}),
    (None, (0.25, 0.125, 0.0625), {}),
    (None, (0.25, 0.125, 0.0625), {"query_window": QUESTION_WINDOW}),
    ((1 / 2, 3 / 4), (0.25, 0.125), {}),
    ((1 / 2, 3 / 4), (0.25, 0.125), {"query_window": QUESTION_WINDOW}),
    ((2 / 3,), (0.25,), {}),
)
# LazyLLM: its defaults, gentler and harder budgets at the paper's layers, and later or fewer stages.
LAZYLLM_GRID = (
    (None, None, {}),
    (None, (0.85, 0.7, 0.5), {}),
    (None, (0.5, 0.3, 0.15), {}),
    ((1 / 3, 2 / 3), (0.5, 0.25), {}),
    ((1 / 2, 3 / 4), (0.5, 0.3), {}),
    ((2 / 3,), (0.3,), {}),
)
GRIDS = {"sliminfer": SLIMINFER_GRID, "lazyllm": LAZYLLM_GRID}


def check_methods(names: list[str]) -> list[str]:
    """The method names, lower-cased; a clear error for an unknown one or one that does not prune in prefill."""
    if not names:
        raise ValueError(f"--methods is empty: give some of {', '.join(PRUNING_METHODS)}")
    for name in names:
        if name.lower() in PRUNING_METHODS:
            continue
        if name.lower() in METHODS:
            hint = " (its filter layers: tokensieve calibrate-filters)" if name.lower() == "omnikv" else ""
            raise ValueError(
                f"--methods {name}: {name} does not prune the prompt in prefill (it computes every prompt token and "
                f"selects or drops KV){hint}; calibrate-pruning calibrates {', '.join(PRUNING_METHODS)}"
            )
        raise ValueError(f"--methods {name}: unknown method; calibrate-pruning calibrates {', '.join(PRUNING_METHODS)}")
    return [name.lower() for name in names]


def default_grid(method: str, num_layers: int) -> list[str]:
    """The default candidates of `method` for a `num_layers`-layer model, as method specs; a setting whose
    layers collapse at this depth (a shallow model) is left out."""
    last = num_layers - 1 if method == "sliminfer" else num_layers - 2  # LazyLLM cannot prune after the last layer
    specs = []
    for fractions, budgets, extra in GRIDS[method]:
        settings = {}
        if fractions is not None:
            layers = [min(last, max(1, round(f * num_layers))) for f in fractions]
            if len(set(layers)) < len(layers):
                continue
            settings["prune_layers"] = tuple(layers)
        if budgets is not None:
            settings["budgets"] = budgets
        settings.update(extra)
        spec = spec_of(METHODS[method](**settings))
        if spec not in specs:
            specs.append(spec)
    return specs


def read_grid(path: str | Path) -> list[str]:
    """Method specs from a JSON file: a list of specs, or an object with a "candidates" list (as
    pruning.json writes one, so a run can be repeated or narrowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--grid {path}: no such file (a JSON list of method specs)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--grid {path}: not valid JSON ({err})") from err
    if isinstance(data, dict):
        data = [c["spec"] if isinstance(c, dict) else c for c in data.get("candidates", [])]
    if not isinstance(data, list) or not data or not all(isinstance(spec, str) for spec in data):
        raise ValueError(f'--grid {path}: expected a non-empty JSON list of method specs, e.g. ["lazyllm"]')
    return data


def check_candidate(spec: str, methods: list[str], num_layers: int | None = None, prompt_len: int = 1) -> str:
    """The method name of a candidate spec; a clear error if it is not one of `methods` or cannot run on a
    `num_layers`-layer model (when given)."""
    method = resolve_method(spec)
    if isinstance(method, Compose) or method.name not in PRUNING_METHODS:
        raise ValueError(f"candidate {spec!r}: give a {' or '.join(PRUNING_METHODS)} spec (no compositions)")
    if method.name not in methods:
        raise ValueError(f"candidate {spec!r} is a {method.name} setting, and --methods is {','.join(methods)}")
    if num_layers is not None:
        try:
            if isinstance(method, LazyLLM):
                method.boundaries(num_layers)
            else:
                method.schedule(num_layers, prompt_len)
        except ValueError as err:
            raise ValueError(f"candidate {spec!r}: {err}") from err
    return method.name
