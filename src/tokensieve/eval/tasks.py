"""Synthetic long-context tasks (RULER-style needles, variable tracking, 2StageRetr, multi-turn).

Every prompt is sized in tokens *of the model under test*: a generator takes the model's tokenizer and a
target length and cuts the haystack so that the first turn's prompt lands within 2% of the target.
Everything is drawn from a `random.Random` seeded by (task, length, seed), so a sample is reproducible.
Scoring is RULER's: the fraction of expected strings found in the output (case-insensitive).
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import words
from .haystack import Haystack

LENGTH_TOLERANCE = 0.02  # prompts land within 2% of the target length

# -- samples ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One question and the strings its answer must contain."""

    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    """A long context followed by one or more questions (turns), each with its expected answers."""

    task: str
    context: str
    turns: tuple[Turn, ...]
    max_new_tokens: int

    def prompt(self, outputs: Sequence[str] = ()) -> str:
        """The prompt of turn `len(outputs)`: the context, earlier questions with the model's answers, the question."""
        if len(outputs) >= len(self.turns):
            raise ValueError(f"{self.task} has {len(self.turns)} turns; got {len(outputs)} earlier outputs")
        history = "".join(f"{turn.question} {out.strip()}\n" for turn, out in zip(self.turns, outputs, strict=False))
        return self.context + history + self.turns[len(outputs)].question

    def messages(self, outputs: Sequence[str] = ()) -> list[dict[str, str]]:
        """The prompt of turn `len(outputs)` as a conversation for a chat template: the context and the first
        question as the user's message, then each earlier answer as the assistant's and the next question as
        the user's (so the model sees its own earlier turns as its own, not pasted into one message)."""
        if len(outputs) >= len(self.turns):
            raise ValueError(f"{self.task} has {len(self.turns)} turns; got {len(outputs)} earlier outputs")
        messages = [{"role": "user", "content": self.context + self.turns[0].question}]
        for turn, out in zip(self.turns[1:], outputs, strict=False):
            messages += [
                {"role": "assistant", "content": out.strip()},
                {"role": "user", "content": turn.question.strip()},
            ]
        return messages

    def score(self, turn: int, output: str) -> float:
        return string_match(output, self.turns[turn].answers)


def string_match(output: str, answers: Sequence[str]) -> float:
    """Fraction of `answers` found in `output` as whole words, ignoring case ("red" is not in "covered")."""
    if not answers:
        raise ValueError("a turn needs at least one expected answer")
    found = [re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", output, re.IGNORECASE) for answer in answers]
    return sum(f is not None for f in found) / len(answers)


# -- needles and values -----------------------------------------------------------------------------------

VALUE_KINDS = ("numbers", "words", "uuids")


def _value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "words":
        return rng.choice(words.VALUE_WORDS)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in words.KEY_ADJECTIVES for b in words.KEY_NOUNS], n)
    return [f"{a}-{b}" for a, b in pairs]


def _distinct_values(rng: random.Random, kind: str, n: int) -> list[str]:
    values: list[str] = []
    while len(values) < n:
        value = _value(rng, kind)
        if value not in values:
            values.append(value)
    return values


def _needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind} for {key} is: {value}."


def _singular(kind: str) -> str:
    return kind[:-1]


def _header(kind: str) -> str:
    return f"Some special magic {kind} are hidden in the text below. Remember them.\n\n"


# -- the generators: each returns (header, needles in order, turns) ----------------------------------------


@dataclass(frozen=True)
class Parts:
    header: str
    needles: list[str]
    turns: list[Turn]
    ordered: bool = False  # needles must appear in the given order (variable-tracking chains)


def _niah_single(rng: random.Random, kind: str) -> Parts:
    (key,), (value,) = _keys(rng, 1), _distinct_values(rng, kind, 1)
    return Parts(_header(kind), [_needle(kind, key, value)], [_question_one(kind, key, (value,))])


def _niah_multikey(rng: random.Random, kind: str, distractors: int = 3) -> Parts:
    keys, values = _keys(rng, 1 + distractors), _distinct_values(rng, kind, 1 + distractors)
    needles = [_needle(kind, k, v) for k, v in zip(keys, values, strict=True)]
    return Parts(_header(kind), needles, [_question_one(kind, keys[0], (values[0],))])


def _niah_multivalue(rng: random.Random, kind: str, values_per_key: int = 4) -> Parts:
    (key,), values = _keys(rng, 1), _distinct_values(rng, kind, values_per_key)
    question = (
        f"\n\nQuestion: What are all the special magic {kind} for {key}?\n"
        f"Answer: The special magic {kind} for {key} are"
    )
    return Parts(_header(kind), [_needle(kind, key, v) for v in values], [Turn(question, tuple(values))])


def _niah_multiquery(rng: random.Random, kind: str, queries: int = 4) -> Parts:
    keys, values = _keys(rng, queries), _distinct_values(rng, kind, queries)
    listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    question = (
        f"\n\nQuestion: What are the special magic {kind} for {listed}?\n"
        f"Answer: The special magic {kind} for {listed} are"
    )
    needles = [_needle(kind, k, v) for k, v in zip(keys, values, strict=True)]
    return Parts(_header(kind), needles, [Turn(question, tuple(values))])


def _multi_turn(rng: random.Random, kind: str, turns: int = 3) -> Parts:
    keys, values = _keys(rng, turns), _distinct_values(rng, kind, turns)
    needles = [_needle(kind, k, v) for k, v in zip(keys, values, strict=True)]
    order = rng.sample(range(turns), turns)  # questions in another order than the needles
    return Parts(_header(kind), needles, [_question_one(kind, keys[i], (values[i],)) for i in order])


def _question_one(kind: str, key: str, answers: tuple[str, ...]) -> Turn:
    one = _singular(kind)
    question = f"\n\nQuestion: What is the special magic {one} for {key}?\nAnswer: The special magic {one} for {key} is"
    return Turn(question, answers)


def _variable_tracking(rng: random.Random, kind: str, hops: int = 4, chains: int = 2) -> Parts:
    """`chains` chains of `hops` assignments each; the question asks for every variable of the first chain."""
    names = rng.sample(sorted({_variable_name(rng) for _ in range(4 * hops * chains)}), (hops + 1) * chains)
    starts = _distinct_values(rng, "numbers", chains)
    statements = []
    for c, start in enumerate(starts):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        statements.append(
            [f"VAR {chain[0]} = {start}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:], strict=False)]
        )
    # Interleave the chains, each in its own order, so the order of statements is the only link.
    needles = []
    while any(statements):
        chain = rng.choice([s for s in statements if s])
        needles.append(chain.pop(0))
    header = "Some variable assignments are hidden in the text below. Remember them.\n\n"
    question = (
        f"\n\nQuestion: Which variables hold the value {starts[0]}, directly or through other variables?\n"
        f"Answer: The variables holding {starts[0]} are:"
    )
    return Parts(header, needles, [Turn(question, tuple(names[: hops + 1]))], ordered=True)


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _two_stage(rng: random.Random, kind: str, entries: int = 100) -> Parts:
    """2StageRetr (OmniKV): the key to look up is a + b, known only once the model has added them."""
    colours = [rng.choice(words.COLOURS) for _ in range(entries)]
    target = rng.randrange(entries)
    a = rng.randint(0, target)
    table = "game = {" + ", ".join(f"{i}: '{c}'" for i, c in enumerate(colours)) + "}."
    header = "A game dictionary from numbers to colours is hidden in the text below.\n\n"
    question = (
        f"\n\nQuestion: Let t = {a} + {target - a}. Which colour does the game give for key t?\n"
        f"Answer: t = {a} + {target - a} ="
    )
    return Parts(header, [table], [Turn(question, (colours[target],))])


@dataclass(frozen=True)
class Task:
    """A task family: a generator of parts and its default kind of values."""

    name: str
    build: Callable[..., Parts]
    default_kind: str = "numbers"
    kinds: tuple[str, ...] = VALUE_KINDS


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("niah_single", _niah_single),
        Task("niah_multikey", _niah_multikey, "words"),
        Task("niah_multivalue", _niah_multivalue),
        Task("niah_multiquery", _niah_multiquery),
        Task("variable_tracking", _variable_tracking, kinds=("numbers",)),
        Task("two_stage", _two_stage, "colours", kinds=("colours",)),
        Task("multi_turn", _multi_turn),
    )
}


def parse_task(spec: str) -> tuple[Task, str]:
    """`"niah_single"` or `"niah_single:uuids"`: the task and the kind of values its needles hold."""
    name, _, kind = spec.partition(":")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    task = TASKS[name]
    kind = kind or task.default_kind
    if kind not in task.kinds:
        raise ValueError(f"task {name} takes values of kind {' or '.join(task.kinds)}, not {kind!r}")
    return task, kind


# -- assembling a prompt of a given length ----------------------------------------------------------------


def make_sample(
    spec: str,
    tokenizer,
    length: int,
    seed: int = 0,
    haystack: Haystack | None = None,
    depth: float | None = None,
) -> Sample:
    """One sample of task `spec` whose first prompt is `length` tokens (within 2%) for `tokenizer`.

    `depth` in [0, 1] puts every needle at that relative position in the haystack (0 = start); None draws
    an independent random depth for each needle.
    """
    task, kind = parse_task(spec)
    if depth is not None and not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1] (0 = start of the haystack), got {depth}")
    if length < 64:
        raise ValueError(f"length must be at least 64 tokens, got {length}")
    rng = random.Random(f"{spec}|{length}|{seed}")
    count = _token_counter(tokenizer)
    sized = {"entries": _table_entries(rng, count, length)} if task.name == "two_stage" else {}
    parts = task.build(rng, kind, **sized)
    haystack = (haystack or Haystack()).draw(rng)
    depths = [depth] * len(parts.needles) if depth is not None else [rng.random() for _ in parts.needles]
    if parts.ordered:
        depths.sort()

    def context(filler: str) -> str:
        return parts.header + _insert(filler, parts.needles, depths) + "\n"

    first = parts.turns[0].question
    filler = haystack(_fit(lambda n: count(context(haystack(n)) + first), length))
    # Prefer ending the haystack on a sentence, then on a word, when that stays within the tolerance.
    for end in (filler[: filler.rfind(". ") + 1], filler[: filler.rfind(" ")], filler):
        got = count(context(end) + first)
        if _close(got, length):
            break
    text = context(end)
    if not _close(got, length):
        raise ValueError(
            f"{spec}: cannot build a {length}-token prompt (closest is {got} tokens): the needles and questions "
            "alone take too much of it; ask for a longer length"
        )
    # Room for the longest answer plus a few words around it (2StageRetr also writes out the sum).
    max_new_tokens = max(count("; ".join(turn.answers)) for turn in parts.turns) + 32
    return Sample(spec, text, tuple(parts.turns), max_new_tokens)


def make_samples(
    spec: str, tokenizer, length: int, n: int, seed: int = 0, haystack: Haystack | None = None, depth=None
) -> list[Sample]:
    """`n` samples of a task (seeds `seed`, `seed + 1`, ...)."""
    return [make_sample(spec, tokenizer, length, seed + i, haystack, depth) for i in range(n)]


def _token_counter(tokenizer) -> Callable[[str], int]:
    """Tokens the engine will see for a text (special tokens such as BOS included)."""
    return lambda text: len(tokenizer(text, verbose=False)["input_ids"])


def _close(tokens: int, target: int) -> bool:
    return abs(tokens - target) <= LENGTH_TOLERANCE * target


def _table_entries(rng: random.Random, count: Callable[[str], int], length: int) -> int:
    """Dictionary size for 2StageRetr: drawn in [40, 200] as in OmniKV, shrunk to fit half the prompt."""
    entries = rng.randint(40, 200)
    while entries > 4 and count(_two_stage(random.Random(0), "colours", entries).needles[0]) > length // 2:
        entries = entries * 4 // 5
    return entries


def _insert(text: str, needles: list[str], depths: list[float]) -> str:
    """`text` with each needle inserted, as its own sentence, at the sentence boundary nearest its depth."""
    cuts = [_sentence_boundary(text, round(d * len(text))) for d in depths]
    pieces, last = [], 0
    for cut, needle in sorted(zip(cuts, needles, strict=True), key=lambda pair: pair[0]):  # stable: keeps order
        pieces += [text[last:cut].strip(), needle]
        last = cut
    pieces.append(text[last:].strip())
    return " ".join(piece for piece in pieces if piece)


def _sentence_boundary(text: str, at: int) -> int:
    """The end of the sentence containing character `at` (0 and len(text) are boundaries too)."""
    if at <= 0:
        return 0
    end = text.find(". ", at)
    return len(text) if end < 0 else end + 1


def _fit(tokens_of: Callable[[int], int], target: int) -> int:
    """The largest haystack size (characters) whose prompt is at most `target` tokens (bisection)."""
    if tokens_of(0) > target:
        return 0
    hi = 4 * target
    while tokens_of(hi) <= target:
        hi *= 2
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokens_of(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo
