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

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .fidelity import forced_logits, greedy_agreement, kl_divergence
from .haystack import Haystack
from .longbench import TASK_METRICS, LongBenchSample, truncate_middle
from .report import Record, Report
from .tasks import Sample, make_samples

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
