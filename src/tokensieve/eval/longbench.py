"""LongBench (v1) data and metrics: the original jsonl schema, the MiniLongBench json files, per-task scores.

Scores are in [0, 1] (LongBench reports them x100). Each prediction is scored against every reference
answer and the best is kept. Chinese tasks (qa_f1_zh, rouge_l_zh) compare words cut by jieba, as LongBench
does; jieba is optional (`pip install 'tokensieve[zh]'`): without it they fall back to characters, with a
warning, and their scores then differ from LongBench's. jieba is imported and its dictionary loaded only when
a Chinese metric is first used. Prompts for the original schema come from short templates of our own.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .tasks import Sample, Turn

# -- metrics ----------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."  # noqa: E501


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: SQuAD-style normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh(text: str) -> str:
    """Lower case, no English or Chinese punctuation, no whitespace."""
    drop = set(string.punctuation + _ZH_PUNCTUATION)
    return "".join(ch for ch in text.lower() if ch not in drop and not ch.isspace())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists."""
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str, **_) -> float:
    """Token F1 over jieba words, each normalised with `normalize_zh` (empty ones dropped), as LongBench."""
    return token_f1(zh_words(prediction), zh_words(reference))


_word_cutter: Callable[[str], list[str]] | None = None  # set on first use: jieba, or characters without it


def zh_words(text: str) -> list[str]:
    """`text` cut into words by jieba (accurate mode, LongBench's `jieba.cut(text, cut_all=False)`), each
    normalised with `normalize_zh`, empty ones dropped; characters if jieba is not installed (with a warning)."""
    global _word_cutter
    if _word_cutter is None:
        _word_cutter = _load_word_cutter()
    return [word for word in map(normalize_zh, _word_cutter(text)) if word]


def _load_word_cutter() -> Callable[[str], list[str]]:
    try:
        import jieba
    except ImportError:
        warnings.warn(
            "jieba is not installed: Chinese LongBench metrics (qa_f1_zh, rouge_l_zh) compare characters, not "
            "words, so their scores differ from LongBench's; install it with pip install 'tokensieve[zh]' "
            "(or pip install jieba)",
            stacklevel=4,
        )
        return list
    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict ..." messages on stderr
    return lambda text: jieba.lcut(text, cut_all=False)


def longest_common_subsequence(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_tokens(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Rouge-L F1: precision and recall of the longest common subsequence."""
    lcs = longest_common_subsequence(prediction, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str, **_) -> float:
    words = re.compile(r"\w+")
    return rouge_l_tokens(words.findall(prediction.lower()), words.findall(reference.lower()))


def rouge_l_zh(prediction: str, reference: str, **_) -> float:
    """Rouge-L F1 over jieba words (`zh_words`). LongBench runs the `rouge` package over the space-joined jieba
    words instead, so its handling of punctuation may differ slightly from this."""
    return rouge_l_tokens(zh_words(prediction), zh_words(reference))


def classification(prediction: str, reference: str, all_classes: Sequence[str] = (), **_) -> float:
    """1 / (number of classes named) if the right one is among them; a class that is only a part of the
    right one (e.g. "Date" inside "Date of birth") does not count against it."""
    if not all_classes:
        raise ValueError("classification needs the task's list of classes (all_classes)")
    named = [c for c in all_classes if c in prediction and not (c in reference and c != reference)]
    return 1 / len(named) if reference in named else 0.0


def retrieval(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction that equal the paragraph number of the reference."""
    wanted = re.findall(r"(?:Paragraph|段落)\s*(\d+)", reference)
    if not wanted:
        raise ValueError(f"retrieval reference {reference!r} names no paragraph ('Paragraph N' or '段落N')")
    return _share_equal(re.findall(r"\d+", prediction), wanted[0])


def count(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction that equal the reference count."""
    return _share_equal(re.findall(r"\d+", prediction), reference.strip())


def _share_equal(numbers: list[str], wanted: str) -> float:
    return sum(n == wanted for n in numbers) / len(numbers) if numbers else 0.0


def edit_similarity(a: str, b: str) -> float:
    """1 - indel distance / total length = 2 * LCS / (len(a) + len(b)) (what `rapidfuzz`'s ratio computes)."""
    if not a and not b:
        return 1.0
    return 2 * longest_common_subsequence(a, b) / (len(a) + len(b))


def code_similarity(prediction: str, reference: str, **_) -> float:
    """Edit similarity of the first line of code in the prediction (comments and fences skipped)."""
    lines = [line for line in prediction.lstrip("\n").split("\n") if not line.strip().startswith(("`", "#", "//"))]
    return edit_similarity(lines[0] if lines else "", reference)


Metric = Callable[..., float]

# The metric of every LongBench task, and how many tokens its answers may take (LongBench's settings).
TASK_METRICS: dict[str, tuple[Metric, int]] = {
    "narrativeqa": (qa_f1, 128),
    "qasper": (qa_f1, 128),
    "multifieldqa_en": (qa_f1, 64),
    "multifieldqa_zh": (qa_f1_zh, 64),
    "hotpotqa": (qa_f1, 32),
    "2wikimqa": (qa_f1, 32),
    "musique": (qa_f1, 32),
    "dureader": (rouge_l_zh, 128),
    "gov_report": (rouge_l, 512),
    "qmsum": (rouge_l, 512),
    "multi_news": (rouge_l, 512),
    "vcsum": (rouge_l_zh, 512),
    "trec": (classification, 64),
    "triviaqa": (qa_f1, 32),
    "samsum": (rouge_l, 128),
    "lsht": (classification, 64),
    "passage_count": (count, 32),
    "passage_retrieval_en": (retrieval, 32),
    "passage_retrieval_zh": (retrieval, 32),
    "lcc": (code_similarity, 64),
    "repobench-p": (code_similarity, 64),
}
# Few-shot tasks answer on the first line; what follows is the model continuing the pattern.
FIRST_LINE_TASKS = {"trec", "triviaqa", "samsum", "lsht"}


def score(task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] = ()) -> float:
    """The LongBench score in [0, 1] of one prediction: the best over the reference answers."""
    metric, _ = _metric(task)
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max((metric(prediction, answer, all_classes=all_classes) for answer in answers), default=0.0)


def _metric(task: str) -> tuple[Metric, int]:
    if task not in TASK_METRICS:
        raise ValueError(f"unknown LongBench task {task!r}: known tasks are {', '.join(TASK_METRICS)}")
    return TASK_METRICS[task]


# -- prompts for the original schema ----------------------------------------------------------------------

_EN_QA = "Answer the question from the text below, as briefly as you can.\n\n{context}\n\nQuestion: {input}\nAnswer:"
_ZH_QA = "请根据下面的文字简要回答问题。\n\n{context}\n\n问题：{input}\n回答："
_EN_SUMMARY = "Summarise the text below.\n\n{context}\n\nSummary:"
TEMPLATES: dict[str, str] = {
    **dict.fromkeys(["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique"], _EN_QA),
    **dict.fromkeys(["multifieldqa_zh", "dureader"], _ZH_QA),
    **dict.fromkeys(["gov_report", "multi_news"], _EN_SUMMARY),
    "qmsum": "Read the meeting transcript below, then answer the query in a few sentences.\n\n{context}\n\n"
    "Query: {input}\nAnswer:",
    "vcsum": "请总结下面的会议记录。\n\n{context}\n\n总结：",
    "trec": "Classify the type of the last question, following the examples.\n\n{context}\n{input}",
    "triviaqa": "Answer the last question, following the examples.\n\n{context}\n\n{input}",
    "samsum": "Summarise the last dialogue, following the examples.\n\n{context}\n\n{input}",
    "lsht": "请仿照示例判断最后一篇新闻的类别。\n\n{context}\n{input}",
    "passage_count": "{context}\n\nHow many different paragraphs are there above once repeats are removed? "
    "Reply with the number only.\nAnswer:",
    "passage_retrieval_en": "{context}\n\nWhich paragraph above is this abstract about?\n{input}\n"
    "Reply like 'Paragraph 3'.\nAnswer:",
    "passage_retrieval_zh": "{context}\n\n下面的摘要出自上面哪一个段落？\n{input}\n请回答例如“段落3”。\n答案：",
    "lcc": "Write the next line of this code.\n\n{context}",
    "repobench-p": "Write the next line of this code.\n\n{context}{input}",
}
assert set(TEMPLATES) == set(TASK_METRICS)


# -- samples and loading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LongBenchSample(Sample):
    """A LongBench prompt (one turn with an empty question) scored by its task's metric."""

    all_classes: tuple[str, ...] = ()

    def score(self, turn: int, output: str) -> float:
        return score(self.task, output, self.turns[turn].answers, self.all_classes)


def make_longbench_sample(
    task: str, prompt: str, answers: Sequence[str], all_classes: Sequence[str] | None = None
) -> LongBenchSample:
    _, max_new_tokens = _metric(task)
    answers = tuple(str(a) for a in answers)
    if not answers:
        raise ValueError(f"{task}: a sample needs at least one reference answer")
    return LongBenchSample(task, prompt, (Turn("", answers),), max_new_tokens, tuple(all_classes or ()))


def from_record(record: dict, task: str | None = None) -> LongBenchSample:
    """A sample from one line of an original LongBench jsonl file (prompt built from our template)."""
    task = task or record.get("dataset")
    if task is None:
        raise ValueError("a LongBench record needs a 'dataset' field (or pass the task name)")
    missing = [k for k in ("context", "input", "answers") if k not in record]
    if missing:
        raise ValueError(f"{task}: LongBench record lacks {', '.join(missing)}")
    _metric(task)
    prompt = TEMPLATES[task].format(context=record["context"], input=record["input"])
    return make_longbench_sample(task, prompt, record["answers"], record.get("all_classes"))


def from_minilongbench(entry: dict, task: str) -> LongBenchSample:
    """A sample from a MiniLongBench entry: `origin_prompt` is the full prompt; `gold` the answers (a list,
    or `{"answers": [...], "all_classes": [...]}` for classification, possibly as a Python literal string)."""
    gold = entry["gold"]
    if isinstance(gold, str):
        gold = ast.literal_eval(gold)
    if isinstance(gold, dict):
        return make_longbench_sample(task, entry["origin_prompt"], gold["answers"], gold.get("all_classes"))
    return make_longbench_sample(task, entry["origin_prompt"], gold)


def load_longbench(path: str | Path, tasks: Sequence[str] | None = None) -> dict[str, list[LongBenchSample]]:
    """LongBench samples by task from a file or a directory of `<task>.jsonl` (original schema) and
    `MiniLongBench_<task>.json` files; `tasks` keeps only those tasks."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LongBench data {path} not found")
    files = sorted(path.glob("*.jsonl")) + sorted(path.glob("MiniLongBench_*.json")) if path.is_dir() else [path]
    samples: dict[str, list[LongBenchSample]] = {}
    for file in files:
        for sample in _read(file):
            if tasks is None or sample.task in tasks:
                samples.setdefault(sample.task, []).append(sample)
    if not samples:
        wanted = f" for tasks {', '.join(tasks)}" if tasks else ""
        raise ValueError(f"no LongBench samples found in {path}{wanted} (expected *.jsonl or MiniLongBench_*.json)")
    return samples


def _read(file: Path) -> list[LongBenchSample]:
    if file.suffix == ".jsonl":
        task = file.stem.removesuffix("_e") if file.stem.removesuffix("_e") in TASK_METRICS else None
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [from_record(json.loads(line), task) for line in lines]
    task = file.stem.removeprefix("MiniLongBench_")
    entries = json.loads(file.read_text(encoding="utf-8"))
    return [from_minilongbench(entries[key], task) for key in sorted(entries, key=int)]


def truncate_middle(tokenizer, prompt: str, max_tokens: int) -> str:
    """`prompt` cut in the middle to at most about `max_tokens` tokens, as LongBench does for long inputs."""
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt
    half = max_tokens // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[len(ids) - (max_tokens - half) :], skip_special_tokens=True)
    return head + tail
