"""The evaluation loop: task x method x length, through the public API only (`engine.generate`).

For every sample, every method runs back to back (in an order rotated from sample to sample), so timings
of a method and of dense are taken under the same conditions, and speedups are paired per sample (median of
dense TTFT / method TTFT).

With `chat=True` every prompt is given to the model through its chat template: a single-turn sample as one
user message followed by the assistant's turn; a multi-turn sample as a conversation, the model's earlier
answers as assistant messages and each new question as a user message (`Sample.messages`). Samples are then
built for `length` minus
the tokens the template adds (`chat_overhead`), so the templated prompts still come out about `length`
tokens long.
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .fidelity import forced_logits, greedy_agreement, kl_divergence
from .haystack import Haystack
from .longbench import TASK_METRICS, LongBenchSample, truncate_middle
from .tasks import Sample, make_samples

MEAN = "mean"  # the task name of the rows that average every task
JOURNAL = "eval.records.jsonl"  # in the output directory: every record as its sample finishes (for --resume)
WARM_UP_TOKENS = 128  # the one short dense call before the timed runs


def parse_length(text: str) -> int:
    """`"2k"` -> 2048, `"512"` -> 512 (k = 1024 tokens, as in RULER's 4K, 8K, ...)."""
    value = text.strip().lower()
    try:
        tokens = round(float(value[:-1]) * 1024) if value.endswith("k") else int(value)
    except ValueError as err:
        raise ValueError(f"bad length {text!r}: use a token count such as 512, 2k or 8k") from err
    if tokens <= 0:
        raise ValueError(f"length must be positive, got {text!r}")
    return tokens


@dataclass
class Record:
    """One sample run by one method at one length (a multi-turn sample counts its turns together)."""

    task: str
    method: str
    length: int
    sample: int
    score: float
    ttft_s: float  # mean over turns
    prompt_tokens: float  # mean over turns
    prefill_fraction: float  # token-layer computations in prefill vs dense, mean over turns
    agreement: float  # greedy agreement with dense's tokens on the same sample
    outputs: list[str]
    expected: list[list[str]]
    kl: float | None = None  # mean KL(dense || method), teacher-forced along dense's first answer (if asked)
    reused_turns: int = 0  # later turns that continued the session (`extend`) rather than recomputing


@dataclass
class Row:
    """A cell of the results table: one task, method and length, over its samples."""

    task: str
    method: str
    length: int
    samples: int
    accuracy: float
    ttft_s: float
    speedup: float  # median over samples of dense TTFT / method TTFT
    prefill_fraction: float
    prompt_tokens: float
    agreement: float
    kl: float | None  # None unless asked for (`kl=True`)


@dataclass
class Report:
    """Every record of an evaluation; `rows` summarises them per task, method and length (plus means)."""

    config: dict[str, Any]
    records: list[Record] = field(default_factory=list)

    @property
    def rows(self) -> list[Row]:
        groups: dict[tuple, list[Record]] = {}
        for r in self.records:
            groups.setdefault((r.task, r.method, r.length), []).append(r)
        rows = [_row(key, group, groups[(key[0], "dense", key[2])]) for key, group in groups.items()]
        return rows + _mean_rows(rows)

    def table(self) -> str:
        rows = self.rows
        # The name columns are as wide as their longest entry, so specs with settings keep the table aligned.
        tw = max([22, *(len(r.task) + 2 for r in rows)])
        mw = max([16, *(len(r.method) + 2 for r in rows)])
        header = f"{'task':<{tw}}{'method':<{mw}}{'length':>7}{'acc':>7}{'TTFT ms':>10}{'speedup':>9}"
        header += f"{'computed':>10}{'agree':>7}{'KL':>9}"
        lines = [header]
        for r in rows:
            kl = "-" if r.kl is None else f"{r.kl:.4f}"
            lines.append(
                f"{r.task:<{tw}}{r.method:<{mw}}{r.length:>7}{r.accuracy:>7.1%}{r.ttft_s * 1e3:>10.1f}"
                f"{r.speedup:>8.2f}x{r.prefill_fraction:>10.1%}{r.agreement:>7.0%}{kl:>9}"
            )
        return "\n".join(lines)

    def save(self, out: str | Path, plot: bool = False) -> list[Path]:
        """Write `eval.json` (config, rows, every record) and `eval.csv` (rows), and `eval.png` if asked."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) for r in self.rows]
        data = {"config": self.config, "environment": _environment(), "rows": rows}
        data["records"] = [asdict(r) for r in self.records]
        paths = [out / "eval.json", out / "eval.csv"]
        paths[0].write_text(json.dumps(data, indent=2, ensure_ascii=False))
        with paths[1].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(Row)])
            writer.writeheader()
            writer.writerows(rows)
        if plot:
            paths.append(self.plot(out / "eval.png"))
        return paths

    def plot(self, path: str | Path) -> Path:
        """Accuracy (mean over tasks) against TTFT speedup, one line per method through its lengths."""
        try:
            import matplotlib
        except ImportError as err:
            raise ValueError("plotting needs matplotlib: pip install 'tokensieve[plot]'") from err

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        means = [r for r in self.rows if r.task == MEAN]
        for method in dict.fromkeys(r.method for r in means):
            points = sorted((r for r in means if r.method == method), key=lambda r: r.length)
            ax.plot([p.speedup for p in points], [p.accuracy for p in points], marker="o", label=method)
            for p in points:
                ax.annotate(_length_label(p.length), (p.speedup, p.accuracy), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        ax.set_xlabel("TTFT speedup vs dense (x)")
        ax.set_ylabel("accuracy (mean over tasks)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def build_samples(
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    seed: int = 0,
    haystack: Haystack | None = None,
    depth: float | None = None,
    longbench: dict[str, list[LongBenchSample]] | None = None,
    chat: bool = False,
) -> dict[tuple[str, int], list[Sample]]:
    """The samples of every (task, length): synthetic tasks are generated to length; LongBench tasks take
    their first `samples` entries, cut in the middle to at most `length` tokens.

    `chat=True` (pass the same to `run_eval`) leaves room for the chat template: prompts are sized to
    `length - chat_overhead(tokenizer)` tokens (synthetic prompts: not below 64), so that templated they are
    about `length` tokens. The samples are then drawn for that length and differ from those without chat.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    overhead = chat_overhead(tokenizer) if chat else 0
    longbench = longbench or {}
    suite = {}
    for length in lengths:
        for task in tasks:
            if task in longbench:
                cut = max(1, length - overhead)
                suite[task, length] = [_truncated(tokenizer, s, cut) for s in longbench[task][:samples]]
            elif task in TASK_METRICS:
                raise ValueError(f"{task} is a LongBench task and no data for it was given: pass --longbench DIR")
            else:
                sized = max(64, length - overhead) if length >= 64 else length  # make_sample rejects < 64
                try:
                    suite[task, length] = make_samples(task, tokenizer, sized, samples, seed, haystack, depth)
                except ValueError as err:
                    if sized == length:
                        raise
                    raise ValueError(f"{err} ({length} tokens less {overhead} for the chat template)") from err
    return suite


def require_chat_template(tokenizer) -> None:
    """A clear `ValueError` if `tokenizer` has no chat template (for `--chat`, before any work is done)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "--chat (chat=True) needs a chat template, and this model's tokenizer has none "
            "(tokenizer.chat_template is empty): drop --chat, or use an instruction-tuned checkpoint whose "
            "tokenizer_config.json or chat_template.jinja defines one"
        )


def chat_overhead(tokenizer) -> int:
    """Tokens the chat template adds to a prompt: a short text as one templated user message (with the
    assistant's turn opened, as `engine.generate(..., chat=True)` encodes it) minus the same text encoded
    plainly (with BOS, as the task generators count it); 0 if the template adds nothing."""
    require_chat_template(tokenizer)
    text = "Hello, world."
    message = [{"role": "user", "content": text}]
    templated = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=False)
    return max(0, len(templated) - len(tokenizer(text, verbose=False)["input_ids"]))


def _truncated(tokenizer, sample: LongBenchSample, length: int) -> LongBenchSample:
    return replace(sample, context=truncate_middle(tokenizer, sample.context, length))


def run_eval(
    engine,
    suite: dict[tuple[str, int], list[Sample]],
    methods: Sequence[str],
    config: dict[str, Any] | None = None,
    progress: bool = True,
    max_new_tokens: int | None = None,
    kl: bool = False,
    chat: bool = False,
    journal: str | Path | None = None,
    resume: bool = False,
) -> Report:
    """Run every method on every sample of `suite` (dense is added first if missing); a `Report`.

    `journal`, a jsonl file, receives each sample's records as soon as all its methods have run, so an
    interrupted run loses at most one sample; with `resume=True` the samples already in it (written with the
    same config) are taken from it, not run again.

    `max_new_tokens` caps each sample's own answer length (for quick runs; answers may be cut short).
    `kl` adds the mean KL(dense || method) of next-token distributions along dense's first answer
    (teacher-forced: one more prefill and decode per method and sample).
    `chat` wraps every prompt (every turn) in the model's chat template (build `suite` with the same `chat`
    so that prompts keep their length); recorded as `config["chat"]`.
    """
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if chat:
        require_chat_template(engine.tokenizer)
    methods = ["dense", *[m for m in methods if m != "dense"]]
    # What each spec ran as: with a model's method defaults a bare name stands for its measured settings.
    settings = {spec: engine.resolve(spec).settings() for spec in methods}
    report = Report(config={**(config or {}), "methods": methods, "method_settings": settings, "chat": chat})
    done = _open_journal(Path(journal), report.config, resume) if journal else {}
    total = sum(len(samples) for samples in suite.values()) * len(methods)
    pending = (
        s
        for (task, length), samples in suite.items()
        for i, s in enumerate(samples)
        if _resumed(done, task, length, i, methods) is None
    )
    first = next(pending, None)
    if first is not None:
        warm_up(engine, _model_input(engine, first, (), chat))
    with tqdm(total=total, desc="eval", unit="run", disable=not progress) as bar:
        for (task, length), samples in suite.items():
            bar.set_postfix_str(f"{task} @ {length}")
            for index, sample in enumerate(samples):
                finished = _resumed(done, task, length, index, methods)
                if finished is not None:
                    report.records.extend(finished)
                    bar.update(len(methods))
                    continue
                shift = index % len(methods)  # rotate the order so no method always runs first
                runs = {}
                for method in methods[shift:] + methods[:shift]:
                    runs[method] = run_sample(engine, sample, method, length, index, max_new_tokens, chat)
                    bar.update()
                dense_turns = runs["dense"][1]
                prompt = _model_input(engine, sample, (), chat) if kl else None
                reference = forced_logits(engine, prompt, dense_turns[0], "dense") if kl else None
                for method in methods:
                    record, turns = runs[method]
                    record.agreement = greedy_agreement(sum(dense_turns, []), sum(turns, []))
                    if reference is not None:
                        forced = forced_logits(engine, prompt, dense_turns[0], method)
                        record.kl = float(kl_divergence(reference, forced).mean())
                    report.records.append(record)
                if journal:
                    _append(Path(journal), report.records[-len(methods) :])
    return report


def _resumed(
    done: dict[tuple, Record], task: str, length: int, index: int, methods: Sequence[str]
) -> list[Record] | None:
    """The journaled records of one sample, every method's, or None when some method still has to run it."""
    records = [done.get((task, length, index, method)) for method in methods]
    return records if all(records) else None


def warm_up(engine, prompt) -> None:
    """One short dense call before the timed runs: the first call pays for allocations and thread start-up,
    which every method shares. Short (the first `WARM_UP_TOKENS` tokens, 2 new) and dense only, so it costs a
    fraction of one sample instead of a full prefill per method; the sample order is rotated besides."""
    ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
    engine.generate(ids[:WARM_UP_TOKENS], max_new_tokens=2, method="dense")


def _open_journal(path: Path, config: dict[str, Any], resume: bool) -> dict[tuple, Record]:
    """The records a resumed run can take, by (task, length, sample, method); a fresh journal otherwise.

    A line cut short by the interruption and everything after it are dropped (and rewritten without them)."""
    header = json.dumps({"config": config}, ensure_ascii=False)
    if not resume or not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + "\n")
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != header:
        raise ValueError(
            f"--resume: {path} was written by a run with other settings (model, tasks, lengths, samples, methods, "
            "...): rerun with the same options, or without --resume to start again"
        )
    records = []
    for line in lines[1:]:
        try:
            records.append(Record(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            break
    path.write_text("\n".join([header, *(json.dumps(asdict(r), ensure_ascii=False) for r in records)]) + "\n")
    return {(r.task, r.length, r.sample, r.method): r for r in records}


def _append(path: Path, records: list[Record]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records)


def _model_input(engine, sample: Sample, outputs: Sequence[str], chat: bool):
    """What the engine is given for the turn after `outputs`: the prompt text, or with `chat` the ids of the
    conversation so far through the chat template (ids, so that `engine.next_token_logits`, which takes no
    `chat`, sees the same prompt as `generate`)."""
    if not chat:
        return sample.prompt(outputs)
    ids = engine.tokenizer.apply_chat_template(
        sample.messages(outputs), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)


def run_sample(engine, sample: Sample, method: str, length: int, index: int, cap: int | None, chat: bool = False):
    """Every turn of `sample` with `method`, each answer fed back into the next turn's prompt; the record
    and each turn's token ids.

    The turns are one engine session, as a conversation is served: a later turn whose prompt ids continue
    the session's tokens (the earlier prompt, the model's answer, the new question) is appended with
    `extend`, so only its new tokens are computed and it sees what the method kept of the earlier turns (a
    dropper's evictions stay evicted; OmniKV can still select any earlier token). A turn whose ids do not
    continue them (a tokenizer that merges across the answer's end differently) starts a new session.
    """
    outputs, gens, reused = [], [], 0
    new_tokens = min(sample.max_new_tokens, cap or sample.max_new_tokens)
    session = None
    for _ in sample.turns:
        ids = engine.encode(_model_input(engine, sample, outputs, chat))
        if session is not None and ids[: len(session.tokens)] == session.tokens and len(ids) > len(session.tokens):
            session.extend(ids[len(session.tokens) :])
            reused += 1
        else:
            if session is not None:
                session.close()
            session = engine.start(ids, method=method)
        gen = session.generate(max_new_tokens=new_tokens)
        outputs.append(gen.text)
        gens.append(gen)
    session.close()
    scores = [sample.score(turn, text) for turn, text in enumerate(outputs)]
    record = Record(
        task=sample.task,
        method=method,
        length=length,
        sample=index,
        score=statistics.fmean(scores),
        ttft_s=statistics.fmean(g.stats.ttft_s for g in gens),
        prompt_tokens=statistics.fmean(g.stats.prompt_tokens for g in gens),
        prefill_fraction=statistics.fmean(g.stats.prefill_fraction for g in gens),
        agreement=1.0,
        outputs=outputs,
        expected=[list(turn.answers) for turn in sample.turns],
        reused_turns=reused,
    )
    return record, [g.token_ids for g in gens]


def _row(key: tuple, group: list[Record], dense: list[Record]) -> Row:
    speedups = [d.ttft_s / r.ttft_s for d, r in zip(dense, group, strict=True)]
    accuracy = statistics.fmean(r.score for r in group)
    return _summary(*key, len(group), accuracy, group, statistics.median(speedups))


def _mean_rows(rows: list[Row]) -> list[Row]:
    """Per method and length, the unweighted mean over tasks (the speedup: the median of the tasks')."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.method, r.length), []).append(r)
    return [
        _summary(
            MEAN,
            method,
            length,
            sum(r.samples for r in group),
            statistics.fmean(r.accuracy for r in group),
            group,
            statistics.median(r.speedup for r in group),
        )
        for (method, length), group in groups.items()
    ]


def _summary(task: str, method: str, length: int, samples: int, accuracy: float, items: list, speedup: float) -> Row:
    """A row whose timing, computed-fraction, prompt-size and agreement columns are means over `items`."""

    def mean(name: str) -> float | None:
        values = [getattr(item, name) for item in items]
        return None if None in values else statistics.fmean(values)

    return Row(
        task, method, length, samples, accuracy, mean("ttft_s"), speedup, mean("prefill_fraction"),
        mean("prompt_tokens"), mean("agreement"), mean("kl"),
    )  # fmt: skip


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _environment() -> dict[str, str]:
    import torch

    import tokensieve

    info = {
        "tokensieve": tokensieve.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info
