"""The testbed's tokenizer: byte-level BPE trained with `tokenizers` on the task suite's own text.

The corpus is procedural haystack prose plus every task family's needles, questions and answers, so the
words of the suite become single tokens and prompts stay short in tokens. Byte-level BPE still encodes any
text (essays, code) losslessly, just in more tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from ..eval.haystack import Haystack
from ..eval.tasks import TASKS, make_sample

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2


class _WordCounter:
    """Stands in for a tokenizer when sizing corpus samples (one token per word): no tokenizer exists yet."""

    def __call__(self, text: str, verbose: bool = False) -> dict[str, list[str]]:
        return {"input_ids": text.split()}


def task_specs() -> list[str]:
    """Every task family with every kind of value it takes, e.g. `niah_single:uuids`."""
    return [f"{name}:{kind}" for name, task in TASKS.items() for kind in task.kinds]


def corpus(samples_per_task: int = 40, seed: int = 0) -> Iterator[str]:
    """Training text for the tokenizer: task prompts with their answers, and plain haystack prose."""
    counter = _WordCounter()
    for spec in task_specs():
        for i in range(samples_per_task):
            sample = make_sample(spec, counter, 400, seed=seed * 1_000_003 + i)
            answers = [", ".join(turn.answers) for turn in sample.turns]
            yield sample.prompt(answers[:-1]) + " " + answers[-1] + "."
    rng = random.Random(seed)
    for _ in range(samples_per_task):
        yield Haystack().draw(rng)(4000)


def train_tokenizer(vocab_size: int = 2048, seed: int = 0, samples_per_task: int = 40):
    """A `PreTrainedTokenizerFast` (BOS prepended, EOS ends an answer) trained on `corpus(...)`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512 (256 bytes plus merges), got {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus(samples_per_task, seed), trainer=trainer)
    bos = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1 << 20
    )


def save_tokenizer(tokenizer, out: str | Path) -> Path:
    """`tokenizer.json` and `tokenizer_config.json` in `out`, loadable by `AutoTokenizer.from_pretrained`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out
