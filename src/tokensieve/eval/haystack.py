"""Haystacks: the filler text around needles, built-in procedural prose (offline, seeded) or a text you give
(a file, RULER's JSON essays, a directory of text files), and how a sample draws its prefix."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

_SUBJECTS = (
    "the old miller",
    "a quiet fox",
    "the river",
    "my neighbour",
    "the baker",
    "a tired sailor",
    "the garden",
    "the choir",
    "a small boat",
    "the lighthouse keeper",
    "the winter wind",
    "a curious child",
    "the village clock",
    "the library",
    "an elderly painter",
)
_VERBS = (
    "watched",
    "carried",
    "remembered",
    "followed",
    "painted",
    "crossed",
    "repaired",
    "described",
    "ignored",
    "welcomed",
    "counted",
    "visited",
)
_OBJECTS = (
    "the morning fog",
    "a basket of apples",
    "the long road",
    "an empty chair",
    "the distant hills",
    "a broken fence",
    "the evening bells",
    "a pile of letters",
    "the narrow bridge",
    "the harvest moon",
    "a forgotten song",
    "the market square",
)
_ENDINGS = (
    "before the rain began",
    "while the kettle boiled",
    "without saying a word",
    "as the sun went down",
    "for most of the afternoon",
    "after the long winter",
    "with great care",
    "in the usual way",
    "once again",
    "as everyone expected",
)


class Haystack:
    """Filler text around the needles: built-in procedural prose (default, offline) or a text you give."""

    def __init__(self, text: str | None = None):
        if text is not None and len(text) < 1000:
            raise ValueError(f"a haystack text needs at least 1000 characters, got {len(text)}")
        self.text = text

    @classmethod
    def from_file(cls, path: str | Path) -> Haystack:
        """A text file (.txt, .md or no suffix), a JSON file `{"text": ...}` (e.g. the Paul Graham essays used
        by RULER), or a directory of text files (joined in name order). Anything else is refused: a .jsonl of
        questions read as prose would put JSON, and even answers, into the haystack."""
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            other = [p.name for p in files if p.suffix.lower() not in HAYSTACK_TEXT_SUFFIXES]
            if other or not files:
                found = f"it holds {', '.join(other)}" if other else "it is empty"
                raise ValueError(f"--haystack {path}: a directory must hold only text files (.txt, .md); {found}")
            return cls(" ".join(_haystack_text(file) for file in files))
        if not path.is_file():
            raise FileNotFoundError(f"haystack file {path} not found")
        if path.suffix.lower() not in HAYSTACK_SUFFIXES:
            raise ValueError(
                f"--haystack {path}: cannot read {path.suffix} files as prose; give a text file (.txt, .md), "
                "a JSON {'text': ...} file or a directory of text files"
            )
        return cls(_haystack_text(path))

    def draw(self, rng: random.Random) -> Callable[[int], str]:
        """A function giving the first `n` characters of one haystack (the same prefix for every `n`)."""
        if self.text is None:
            seed = rng.getrandbits(64)
            return lambda n: _procedural(seed, n)[:n]
        start = self.text.find(". ", rng.randrange(len(self.text))) + 2  # a sentence start (or 1: wrap around)
        rotated = self.text[start:] + " " + self.text[:start]
        return lambda n: (rotated * (1 + n // len(rotated)))[:n]

    def __repr__(self) -> str:
        return "Haystack(procedural)" if self.text is None else f"Haystack({len(self.text)} characters)"


HAYSTACK_TEXT_SUFFIXES = ("", ".txt", ".md")
HAYSTACK_SUFFIXES = (*HAYSTACK_TEXT_SUFFIXES, ".json")


def _haystack_text(path: Path) -> str:
    """The prose of one haystack file, on one line (the needles' sentences then stand out less)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--haystack {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"--haystack {path}: not valid JSON ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise ValueError(f"{path}: expected a JSON object with a 'text' string")
        raw = data["text"]
    return " ".join(raw.split())


def _procedural(seed: int, n_chars: int) -> str:
    rng = random.Random(seed)
    sentences, size = [], 0
    while size < n_chars:
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_ENDINGS)]
        sentence = " ".join(words).capitalize() + "."
        sentences.append(sentence)
        size += len(sentence) + 1
    return " ".join(sentences)
