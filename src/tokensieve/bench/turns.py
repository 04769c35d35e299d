"""`--mode multi-turn`: a conversation over a long document, each turn by `session.extend` vs recomputed.

Turn 1 is the document and a question; each later turn appends the previous answer and a new question.
*Extend*: one session (`engine.start`, then `session.extend(question)` + `session.generate` per turn),
so a turn computes only its new tokens. *Recompute*: `engine.generate` over the whole conversation so far
(the same token ids), as a server without a session cache would. `transformers` recomputes with its
`generate`. A turn's time is its prefill (or extension) and its `new_tokens` answer. The ideal is the
dense FLOP model's: recompute prefill FLOPs over the extension's, applied to the recompute's prefill time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ..engine import Engine
from ..model import ModelSpec
from . import costs
from .report import ms, render, spread, x
from .runner import DENSE, HAYSTACK, TRANSFORMERS, check_lengths, contestants, hf_generate, timed

QUESTIONS = (
    "\n\nQuestion: What is the main subject of the text above? Answer:",
    "\n\nQuestion: Which example in the text is the most surprising? Answer:",
    "\n\nQuestion: What would the author advise a beginner? Answer:",
    "\n\nQuestion: Summarise the text in one sentence. Answer:",
)


def document_ids(tokenizer, length: int, path: str | Path | None = None) -> list[int]:
    """The first `length` tokens of a document: a text file, a JSON `{"text": ...}` (the haystack file of
    ../shared/data/haystack) or, without a path, the runner's haystack sentences."""
    if path is None:
        text = HAYSTACK * (length // 4 + 8)
    else:
        raw = Path(path).read_text()
        text = json.loads(raw)["text"] if str(path).endswith(".json") else raw
    ids = tokenizer(text)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"--document has {len(ids)} tokens, fewer than the {length} asked for: give a shorter length")
    return list(ids[:length])


def measure_turns(
    engine: Engine,
    methods: Sequence[str],
    length: int,
    *,
    turns: int = 4,
    new_tokens: int = 16,
    repeats: int = 1,
    document: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Per contestant and turn: seconds with `extend` and recomputed (medians of `repeats`), tokens compared."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    check_lengths(engine, [length], turns * (new_tokens + 32), repeats)
    names = [name for name in contestants(methods) if name != TRANSFORMERS] + [TRANSFORMERS]  # dense first
    doc = document_ids(engine.tokenizer, length, document)
    questions = [QUESTIONS[k % len(QUESTIONS)] for k in range(turns)]
    times = {(name, k): {"extend": [], "recompute": []} for name in names for k in range(turns)}
    extended: dict[tuple[str, int], dict[str, Any]] = {}  # transformers recomputes dense's conversation
    recomputed: dict[tuple[str, int], list[int]] = {}
    for repeat in range(repeats):
        for name in names:
            order = ("extend", "recompute") if repeat % 2 == 0 else ("recompute", "extend")
            for way in order:
                if way == "extend" and name != TRANSFORMERS:
                    for k, (seconds, record) in enumerate(_extend_turns(engine, name, doc, questions, new_tokens)):
                        times[name, k]["extend"].append(seconds)
                        extended[name, k] = record
                elif way == "recompute":
                    source = DENSE if name == TRANSFORMERS else name
                    for k in range(turns):
                        prefix = extended[source, k]["prefix"]
                        seconds, recomputed[name, k] = _recompute(engine, name, prefix, new_tokens)
                        times[name, k]["recompute"].append(seconds)
    spec = engine.model.spec
    return [
        _row(spec, name, k, times[name, k], extended[DENSE if name == TRANSFORMERS else name, k], recomputed[name, k])
        for name in names
        for k in range(turns)
    ]


def _extend_turns(engine: Engine, name: str, doc: list[int], questions: list[str], new_tokens: int):
    """Yield (seconds, record) per turn of one session; a record holds the ids the turn's prefill saw."""
    session, done = None, 0
    try:
        for question in questions:
            ids = engine.encode(question, special_tokens=False)
            seconds, (session, generation) = timed(engine, partial(_turn, engine, session, name, doc, ids, new_tokens))
            prefix = session.tokens[: len(session.tokens) - len(generation.token_ids)]
            yield seconds, {"prefix": prefix, "computed": len(prefix) - done, "tokens": generation.token_ids}
            done = len(prefix)
    finally:
        if session is not None:
            session.close()


def _turn(engine: Engine, session, name: str, doc: list[int], ids: list[int], new_tokens: int):
    """One turn: the session started over the document (the first) or extended by the question, then answered."""
    if session is None:
        session = engine.start(doc + ids, method=name)
    else:
        session.extend(ids)
    return session, session.generate(max_new_tokens=new_tokens)


def _recompute(engine: Engine, name: str, prefix: list[int], new_tokens: int) -> tuple[float, list[int]]:
    if name == TRANSFORMERS:
        return timed(engine, lambda: hf_generate(engine, prefix, new_tokens))[0], []
    seconds, generation = timed(engine, lambda: engine.generate(prefix, max_new_tokens=new_tokens, method=name))
    return seconds, generation.token_ids


def _row(
    spec: ModelSpec, name: str, turn: int, times: dict, record: dict[str, Any], recomputed: list[int]
) -> dict[str, Any]:
    context = len(record["prefix"])
    extend = spread(times["extend"]) if times["extend"] else None
    recompute = spread(times["recompute"])
    flops = costs.prefill_flops(spec, [context] * spec.num_layers)
    return {
        "method": name,
        "turn": turn + 1,
        "context_tokens": context,
        "computed_tokens": record["computed"],
        "extend_s": extend,
        "recompute_s": recompute,
        "speedup": recompute["median"] / extend["median"] if extend else None,
        "ideal_prefill_speedup": flops / costs.extend_flops(spec, context - record["computed"], record["computed"]),
        "same_tokens": record["tokens"] == recomputed if name != TRANSFORMERS else None,
    }


def turns_table(rows: Sequence[dict[str, Any]]) -> str:
    """Seconds per turn with `extend` and recomputed, the speedup, and the FLOP ideal of the prefill part."""
    lines = [("method", "turn", "context", "computed", "extend ms [min-max]", "recompute ms [min-max]")]
    lines[0] += ("x recompute", "ideal (prefill)", "same tokens")
    for r in rows:
        same = "-" if r["same_tokens"] is None else ("yes" if r["same_tokens"] else "no")
        lines.append(
            (r["method"], r["turn"], r["context_tokens"], r["computed_tokens"])
            + (ms(r["extend_s"]) if r["extend_s"] else "-", ms(r["recompute_s"]), x(r["speedup"]))
            + (x(r["ideal_prefill_speedup"]) if r["extend_s"] else "-", same)
        )
    return f"Multi-turn (extend vs recompute)\n{render(lines)}"
