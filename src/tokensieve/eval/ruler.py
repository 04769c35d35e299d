"""RULER's own jsonl files as a task source: one sample a line with `input` (the whole prompt), `outputs`
(the expected strings) and `length` (the prompt's length in RULER's tokens).

Scored by RULER's rule for its synthetic tasks: the fraction of expected outputs found in the answer, as
substrings, ignoring case (RULER's `string_match_all`). Records are grouped by their own `length`: a RULER
file is generated for one tokenizer and length, so `--lengths` does not resize them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .tasks import Sample, Turn

RULER_FIELDS = ("input", "outputs", "length")
RULER_MAX_NEW_TOKENS = 128  # RULER's own generation length for its needle tasks


@dataclass(frozen=True)
class RulerSample(Sample):
    """A RULER prompt (one turn with an empty question), scored by the fraction of outputs found."""

    length: int = 0

    def score(self, turn: int, output: str) -> float:
        expected = self.turns[turn].answers
        return sum(answer.lower() in output.lower() for answer in expected) / len(expected)


def load_ruler(path: str | Path) -> dict[tuple[str, int], list[RulerSample]]:
    """The samples of a RULER jsonl file by (task, length); the task is `ruler:<file stem>`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ruler {path} not found (give one RULER jsonl file)")
    task = f"ruler:{path.stem}"
    suite: dict[tuple[str, int], list[RulerSample]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            sample = _sample(task, _record(path, number, line))
            suite.setdefault((task, sample.length), []).append(sample)
    if not suite:
        raise ValueError(f"--ruler {path} holds no records")
    return suite


def _record(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"--ruler {path}, line {number}: not JSON ({err})") from err
    missing = [name for name in RULER_FIELDS if not isinstance(record, dict) or name not in record]
    if missing:
        raise ValueError(
            f"--ruler {path}, line {number}: a RULER record needs the fields {', '.join(RULER_FIELDS)}; "
            f"missing {', '.join(missing)}"
        )
    outputs = record["outputs"]
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
        raise ValueError(f"--ruler {path}, line {number}: 'outputs' must be a non-empty list of strings")
    if not isinstance(record["input"], str) or not record["input"]:
        raise ValueError(f"--ruler {path}, line {number}: 'input' must be the prompt text")
    if isinstance(record["length"], bool) or not isinstance(record["length"], int) or record["length"] < 1:
        raise ValueError(f"--ruler {path}, line {number}: 'length' must be a positive int")
    return record


def _sample(task: str, record: dict) -> RulerSample:
    turn = Turn("", tuple(record["outputs"]))
    return RulerSample(task, record["input"], (turn,), RULER_MAX_NEW_TOKENS, record["length"])
