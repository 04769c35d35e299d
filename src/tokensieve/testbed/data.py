"""The training mixture: task samples with the loss on their answers, plus plain LM on haystack text.

A task example is exactly what `tokensieve eval` will show the model: `make_sample(...)`'s prompt, tokenized
as the engine tokenizes it, followed by the answer tokens and EOS. Each target has a role: ANSWER (the
task loss) or TEXT (language modelling on the context and on plain haystack text, weighed less in training).
Seeds are drawn from `TRAIN_SEEDS` upward, far from the small seeds (0, 1, ...) that evaluation uses, so
evaluation is on held-out samples.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from ..eval.haystack import Haystack
from ..eval.tasks import Sample, make_sample
from .tokenizer import task_specs

TRAIN_SEEDS = 1_000_000  # training samples use seeds >= this; evaluation uses 0, 1, 2, ...
IGNORE, TEXT, ANSWER = 0, 1, 2  # the role of a target in the loss


@dataclass(frozen=True)
class Example:
    ids: list[int]
    targets: list[int]  # the token to predict after ids[: i + 1]
    roles: list[int]  # IGNORE, TEXT or ANSWER: how targets[i] counts in the loss

    @classmethod
    def shifted(cls, ids: list[int], roles: list[int], pad_id: int) -> Example:
        """Next-token targets from `ids`, where `roles[i]` is the role of predicting `ids[i]`."""
        return cls(ids, ids[1:] + [pad_id], roles[1:] + [IGNORE])


def answer_text(sample: Sample, turn: int) -> str:
    """What the model is taught to reply: the expected strings, in a form `Sample.score` accepts."""
    answers = sample.turns[turn].answers
    if sample.task.startswith("two_stage"):  # say the sum first, then the colour as the table writes it
        a, b = map(int, re.search(r"t = (\d+) \+ (\d+)", sample.turns[turn].question).groups())
        return f" {a + b}: '{answers[0]}'."
    if len(answers) == 1:  # a single needle: repeat its own continuation ("...for KEY is: VALUE."), a pure copy
        return f": {answers[0]}."
    return " " + ", ".join(answers) + "."


def task_example(tokenizer, spec: str, length: int, seed: int) -> Example:
    """Every turn of a `length`-token sample with teacher-forced answers, each answer taught to end with EOS.

    A multi-turn conversation continues after an answer without EOS in the input (the next prompt holds
    only the answer text), so there the EOS is a target only.
    """
    sample = _fitting_sample(spec, tokenizer, length, seed)
    ids = list(tokenizer(sample.context + sample.turns[0].question)["input_ids"])
    roles = [IGNORE] + [TEXT] * (len(ids) - 1)
    answer_ends = []
    for turn in range(len(sample.turns)):
        if turn:  # the next question, as `Sample.prompt` appends it after the previous answer
            question = tokenizer("\n" + sample.turns[turn].question, add_special_tokens=False)["input_ids"]
            ids += question
            roles += [TEXT] * len(question)
        answer = tokenizer(answer_text(sample, turn), add_special_tokens=False)["input_ids"]
        ids += answer
        roles += [ANSWER] * len(answer)
        answer_ends.append(len(ids) - 1)
    example = Example.shifted(ids, roles, tokenizer.pad_token_id)
    for end in answer_ends:
        example.targets[end], example.roles[end] = tokenizer.eos_token_id, ANSWER
    return example


def _fitting_sample(spec: str, tokenizer, length: int, seed: int) -> Sample:
    """`make_sample`, lengthened where the needles alone overflow a short prompt (e.g. 4 uuid queries in 128)."""
    for _ in range(8):
        try:
            return make_sample(spec, tokenizer, length, seed=seed)
        except ValueError:
            length = length * 5 // 4
    return make_sample(spec, tokenizer, length, seed=seed)


def haystack_example(tokenizer, length: int, seed: int) -> Example:
    """Plain language modelling on `length` tokens of procedural haystack text."""
    text = Haystack().draw(random.Random(seed))(length * 8)
    ids = list(tokenizer(text)["input_ids"])[:length]
    return Example.shifted(ids, [IGNORE] + [TEXT] * (len(ids) - 1), tokenizer.pad_token_id)


def copy_example(tokenizer, length: int, seed: int, segment: int = 32) -> Example:
    """`segment` random tokens, random filler up to `length`, then the segment again, the repeat supervised:
    the quickest way to grow the induction heads (attend to the token after an earlier occurrence of this
    one) that retrieval needs, at every distance up to `length`."""
    rng = random.Random(seed)
    segment = min(segment, length // 2)

    def draw(n: int) -> list[int]:
        return [rng.randrange(len(tokenizer.all_special_ids), len(tokenizer)) for _ in range(n)]

    repeated, filler = draw(segment), draw(length - 2 * segment)
    ids = [tokenizer.bos_token_id, *repeated, *filler, *repeated]
    roles = [IGNORE] * (1 + segment + len(filler)) + [ANSWER] * segment
    return Example.shifted(ids, roles, tokenizer.pad_token_id)


def draw_examples(
    tokenizer,
    length: int,
    tokens: int,
    seed: int,
    haystack_fraction: float = 0.05,
    copy_fraction: float = 0.2,
    copy_segment: int = 32,
) -> list[Example]:
    """Examples of about `length` tokens, `tokens` in all: plain haystack text, copy examples, and task
    samples (every task spec equally likely); sorted by length (so that batches of neighbours pad little);
    deterministic in `seed`."""
    rng = random.Random(seed)
    specs = task_specs()
    examples: list[Example] = []
    while sum(len(e.ids) for e in examples) < tokens:
        sample_seed = TRAIN_SEEDS + rng.getrandbits(40)
        draw = rng.random()
        if draw < haystack_fraction:
            examples.append(haystack_example(tokenizer, length, sample_seed))
        elif draw < haystack_fraction + copy_fraction:
            examples.append(copy_example(tokenizer, length, sample_seed, copy_segment))
        else:
            examples.append(task_example(tokenizer, rng.choice(specs), length, sample_seed))
    return sorted(examples, key=lambda e: len(e.ids))


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, targets and roles `[batch, time]` (IGNORE on padding)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), pad_id, dtype=torch.long)
    roles = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        targets[row, : len(e.ids)] = torch.tensor(e.targets)
        roles[row, : len(e.ids)] = torch.tensor(e.roles)
    return ids, targets, roles


def stretched_positions(length: int, max_position: int, rng: random.Random) -> list[int]:
    """Positional skip-wise training (PoSE): two chunks with a random gap, so relative distances up to
    `max_position` are seen while the sequence itself stays short."""
    if length >= max_position:
        return list(range(length))
    cut = rng.randrange(1, length)
    gap = rng.randrange(0, max_position - length + 1)
    return list(range(cut)) + list(range(cut + gap, length + gap))
