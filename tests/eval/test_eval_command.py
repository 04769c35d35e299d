"""`tokensieve eval`: runs end to end on a tiny preset, writes its files, and fails clearly on bad input."""

from __future__ import annotations

import csv
import json
import re

import pytest

from conftest import STORIES, needs_stories
from tokensieve import presets
from tokensieve.cli import main
from tokensieve.engine.session import Session
from tokensieve.eval import runner
from tokensieve.eval.report import MEAN
from tokensieve.eval.runner import build_samples, chat_overhead, parse_length, run_eval
from tokensieve.eval.tasks import TASKS
from tokensieve.generation import Generation, Stats
from tokensieve.methods import METHODS, Compose, Dense

# dense plus one more registered method when there is one (a cheap one), to check the pairing with dense
OTHERS = sorted(set(METHODS) - {"dense"}, key=lambda name: (name != "streaming_llm", name))
METHODS_UNDER_TEST = ["dense", *OTHERS[:1]]


def eval_cli(tmp_path, *extra: str) -> dict:
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny", "--samples", "2", "--max-new-tokens", "2", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "eval.json").read_text())


def test_eval_on_tiny_preset_writes_every_row(tmp_path, capsys):
    data = eval_cli(tmp_path, "--methods", ",".join(METHODS_UNDER_TEST), "--lengths", "640", "--plot")
    rows = {(r["task"], r["method"], r["length"]): r for r in data["rows"]}
    for task in [*TASKS, MEAN]:
        for method in METHODS_UNDER_TEST:
            for length in (640,):
                row = rows[task, method, length]
                assert 0 <= row["accuracy"] <= 1 and row["ttft_s"] > 0 and row["speedup"] > 0
                assert 0 < row["prefill_fraction"] <= 1 and 0 <= row["agreement"] <= 1
                if task not in (MEAN, "multi_turn"):  # later turns add the earlier questions and answers
                    assert row["samples"] == 2 and abs(row["prompt_tokens"] - length) <= 0.02 * length + 1
    assert all(r["agreement"] == 1.0 and r["speedup"] == 1.0 for r in data["rows"] if r["method"] == "dense")
    assert len(data["records"]) == len(TASKS) * 2 * len(METHODS_UNDER_TEST)
    assert data["config"]["methods"] == METHODS_UNDER_TEST and data["environment"]["torch"]
    with (tmp_path / "out" / "eval.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    assert (tmp_path / "out" / "eval.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "niah_single" in printed and "wrote" in printed


def test_eval_rows_for_every_length(tmp_path):
    data = eval_cli(tmp_path, "--methods", "dense", "--tasks", "niah_single", "--lengths", "300,0.5k")
    assert {(r["task"], r["length"]) for r in data["rows"]} == {
        (task, length) for task in ("niah_single", MEAN) for length in (300, 512)
    }


def test_eval_adds_dense_and_takes_longbench_data(tmp_path):
    record = dict(input="Who wrote it?", context="It was written by Ann. " * 30, answers=["Ann"], length=5,
                  dataset="hotpotqa", language="en", all_classes=None, _id="a")  # fmt: skip
    lb_dir = tmp_path / "lb"
    lb_dir.mkdir()
    (lb_dir / "hotpotqa.jsonl").write_text(json.dumps(record) + "\n")
    data = eval_cli(tmp_path, "--methods", METHODS_UNDER_TEST[-1], "--longbench", str(lb_dir), "--lengths", "200")
    assert {(r["task"], r["method"]) for r in data["rows"]} >= {("hotpotqa", m) for m in METHODS_UNDER_TEST}
    assert all(r["prompt_tokens"] <= 202 for r in data["records"])  # cut in the middle to the length


class OracleEngine:
    """A stand-in engine that reads the asked key's value off the prompt; "fast" reports half dense's TTFT.
    Its tokens are the prompt's UTF-8 bytes; a session's later turns are `extend`ed, as the runner does."""

    tokenizer = presets.byte_tokenizer()

    def __init__(self):
        self.warm_ups = []
        self.extended = []

    def encode(self, prompt):
        return list(prompt.encode()) if isinstance(prompt, str) else list(prompt)

    def generate(self, prompt, *, max_new_tokens, method):  # only the short warm-up calls it
        self.warm_ups.append((len(prompt), method))
        return Generation(text="", token_ids=[], stats=Stats(method={"name": method}), finish_reason="length")

    def start(self, ids, *, method):
        return OracleSession(self, list(ids), method)

    def resolve(self, method):
        return Dense() if method == "dense" else Compose(Dense(), Dense())  # what the runner records


class OracleSession:
    def __init__(self, engine, tokens, method):
        self.engine, self.tokens, self.method, self.computed = engine, tokens, method, len(tokens)

    def extend(self, ids):
        self.engine.extended.append(len(ids))
        self.tokens += ids
        self.computed = len(ids)

    def generate(self, *, max_new_tokens):
        prompt = bytes(self.tokens).decode()
        key = re.findall(r"special magic \w+ for (\S+)\?", prompt)[-1]
        value = re.search(rf"for {re.escape(key)} is: (\S+)\.", prompt).group(1)
        ttft = 0.01 if self.method == "dense" else 0.005
        stats = Stats(method={"name": self.method}, prompt_tokens=self.computed, ttft_s=ttft)
        stats.prefill_tokens_per_layer = [self.computed] * 2
        answer = list(f" {value}.".encode())
        self.tokens += answer
        return Generation(text=f" {value}.", token_ids=answer, stats=stats, finish_reason="length")

    def close(self):
        pass


def test_runner_scores_a_perfect_model_and_pairs_speedups():
    engine = OracleEngine()
    suite = build_samples(engine.tokenizer, ["niah_single", "multi_turn"], [700], samples=2)
    report = run_eval(engine, suite, ["fast"], progress=False)
    rows = {(r.task, r.method): r for r in report.rows}
    assert all(r.accuracy == 1.0 and r.agreement == 1.0 for r in report.rows)
    assert rows["multi_turn", "fast"].speedup == pytest.approx(2.0) and rows["mean", "dense"].speedup == 1.0
    assert len(report.records) == 2 * 2 * 2 and report.config["methods"] == ["dense", "fast"]
    assert report.config["method_settings"]["fast"]["name"] == "dense+dense"  # each spec as the engine resolved it
    assert engine.warm_ups == [(runner.WARM_UP_TOKENS, "dense")]  # one short warm-up, not a prefill per method
    # multi_turn's later turns continue the session: 2 turns after the first, per sample and method
    turns = {(r.task, r.method): r.reused_turns for r in report.records}
    assert turns["multi_turn", "fast"] == 2 and turns["niah_single", "fast"] == 0
    assert len(engine.extended) == 2 * 2 * 2 and all(
        0 < n < 200 for n in engine.extended
    )  # the new turn only (of a 700-token prompt)


def test_eval_kl_column(tmp_path):
    data = eval_cli(
        tmp_path, "--methods", ",".join(METHODS_UNDER_TEST), "--tasks", "niah_single", "--lengths", "640", "--kl"
    )
    assert all(r["kl"] is not None and r["kl"] >= 0 for r in data["rows"])
    assert all(r["kl"] < 1e-6 for r in data["rows"] if r["method"] == "dense")
    assert {spec: s["name"] for spec, s in data["config"]["method_settings"].items()} == {
        spec: spec.split("(")[0] for spec in METHODS_UNDER_TEST
    }
    no_kl = eval_cli(tmp_path, "--methods", "dense", "--tasks", "niah_single", "--lengths", "640")
    assert all(r["kl"] is None for r in no_kl["rows"])


@needs_stories()
def test_eval_on_stories_checkpoint(tmp_path):
    out = tmp_path / "out"
    argv = ["eval", "--model", str(STORIES), "--methods", "dense", "--tasks", "niah_single,two_stage"]
    assert main([*argv, "--lengths", "400", "--samples", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert {(r["task"], r["length"]) for r in rows} == {("niah_single", 400), ("two_stage", 400), (MEAN, 400)}


def test_unknown_method_task_and_bad_lengths_are_clear_errors(tmp_path, capsys):
    base = ["eval", "--model", "tiny", "--out", str(tmp_path)]
    assert main([*base, "--methods", "dense,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main([*base, "--tasks", "nope", "--lengths", "700"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main([*base, "--tasks", "hotpotqa", "--lengths", "700"]) == 2
    assert "pass --longbench DIR" in capsys.readouterr().err
    assert main([*base, "--lengths", "2x"]) == 2
    assert "bad length '2x'" in capsys.readouterr().err
    assert parse_length("2k") == 2048 and parse_length("1.5k") == 1536 and parse_length("300") == 300


def test_testbed_resolves_to_embedded_dir_or_says_it_is_missing(tmp_path, monkeypatch, capsys):
    import tokensieve.testbed as testbed
    from tokensieve.loading import resolve_model_path

    monkeypatch.setattr(testbed, "MODEL_DIR", tmp_path / "model")
    with pytest.raises(ValueError, match="embedded testbed model is missing"):
        resolve_model_path("testbed")
    assert main(["eval", "--lengths", "700", "--out", str(tmp_path)]) == 2  # testbed is the default model
    assert "testbed model is missing" in capsys.readouterr().err
    (tmp_path / "model").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "model" / name).write_text("{}")
    assert resolve_model_path("testbed") == tmp_path / "model"
    with pytest.raises(ValueError, match="model 'some/dir' not found.*testbed, smollm2.*tiny"):
        resolve_model_path("some/dir")


TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"


def chat_engine():
    from tokensieve import load

    model, tokenizer = presets.build("tiny")
    tokenizer.chat_template = TEMPLATE
    return load(model, tokenizer=tokenizer)


def test_chat_overhead_counts_the_template_tokens():
    """The tokens `build_samples(..., chat=True)` leaves for the template, so templated prompts keep their length."""
    # Byte tokenizer: "<|user|>" (8) and "<|assistant|>" (13) added; the template has no BOS, the plain text 1.
    assert chat_overhead(chat_engine().tokenizer) == 8 + 13 - 1
    with pytest.raises(ValueError, match="no chat template|has none"):
        chat_overhead(presets.byte_tokenizer())


def test_run_eval_with_chat_gives_the_model_templated_ids_on_every_turn(monkeypatch):
    engine = chat_engine()
    seen, logits_seen, warm_ups = [], [], []
    generate, next_token_logits = engine.generate, engine.next_token_logits
    monkeypatch.setattr(engine, "generate", lambda prompt, **kw: warm_ups.append(prompt) or generate(prompt, **kw))
    session_generate = Session.generate
    # what each turn's generation continues: the whole conversation so far, whether extended or started anew
    monkeypatch.setattr(Session, "generate", lambda s, **kw: seen.append(list(s.tokens)) or session_generate(s, **kw))
    monkeypatch.setattr(
        engine, "next_token_logits", lambda p, c, **kw: logits_seen.append(p) or next_token_logits(p, c, **kw)
    )
    suite = build_samples(engine.tokenizer, ["multi_turn"], [500], samples=1, chat=True)
    report = run_eval(engine, suite, ["dense"], progress=False, max_new_tokens=2, kl=True, chat=True)
    sample, (record,) = suite["multi_turn", 500][0], report.records
    template = engine.tokenizer.apply_chat_template
    turns = [
        template(sample.messages(record.outputs[:i]), add_generation_prompt=True, return_dict=False) for i in range(3)
    ]
    assert warm_ups == [turns[0][: runner.WARM_UP_TOKENS]]  # one short warm-up
    assert seen == turns  # then the 3 turns, as templated ids
    assert turns[0] == engine.encode(sample.prompt(), chat=True)  # turn 1: one user message
    # later turns: a conversation, the model's own answers as assistant messages, not pasted into the question
    third = engine.tokenizer.decode(turns[2])
    for answer, question in zip(record.outputs[:2], [t.question for t in sample.turns[1:]], strict=True):
        assert f"<|assistant|>{answer.strip()}<|user|>{question.strip()}" in third
    assert third.count("<|user|>") == 3 and third.endswith("<|assistant|>")
    assert logits_seen == [turns[0]] * 2  # the KL (reference, then dense as a method) sees the same prompt
    text = engine.tokenizer.decode(turns[0])
    assert text.startswith("<|user|>Some special magic") and text.endswith(" is<|assistant|>")
    assert abs(len(turns[0]) - 500) <= 0.02 * 500 + 1  # sized to the asked length with the template
    if record.reused_turns:  # a continued turn computes only its new tokens
        assert record.prompt_tokens < sum(map(len, turns)) / 3
    else:
        assert record.prompt_tokens == pytest.approx(sum(map(len, turns)) / 3)
    assert report.config["chat"] is True


def test_eval_cli_chat(tmp_path, monkeypatch, capsys):
    byte_tokenizer = presets.byte_tokenizer

    def with_template():
        tokenizer = byte_tokenizer()
        tokenizer.chat_template = TEMPLATE
        return tokenizer

    base = ["--methods", "dense", "--tasks", "niah_single", "--lengths", "400"]
    assert eval_cli(tmp_path, *base)["config"]["chat"] is False
    with monkeypatch.context() as m:
        m.setattr(presets, "byte_tokenizer", with_template)
        data = eval_cli(tmp_path, *base, "--chat")
    assert data["config"]["chat"] is True
    assert all(abs(r["prompt_tokens"] - 400) <= 9 for r in data["records"])

    # No template (the tiny preset's byte tokenizer): a clear error before any sample is built.
    monkeypatch.setattr(runner, "build_samples", lambda *a, **k: pytest.fail("built samples before failing"))
    assert main(["eval", "--model", "tiny", *base, "--chat", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--chat" in err and "chat template" in err and "has none" in err


def test_table_stays_aligned_with_long_method_specs():
    from tokensieve.eval.report import Record, Report

    spec = "omnikv(budget=256, offload=False, selector='last')"
    report = Report(config={})
    for method, ttft in (("dense", 2.0), (spec, 1.0)):
        report.records.append(Record("niah_single:numbers", method, 2048, 0, 1.0, ttft, 2048, 1.0, 1.0, ["x"], [["x"]]))
    lines = report.table().splitlines()
    assert len({line.index("2048") for line in lines[1:]}) == 1  # the length column starts at one place
    assert lines[0].index("length") + len("length") == lines[1].index("2048") + len("2048")
    assert spec in lines[2] and "2.00x" in lines[2]


def test_results_are_journaled_as_they_finish_and_an_interrupted_run_resumes(tmp_path, monkeypatch, capsys):
    options = ["--methods", "dense,streaming_llm", "--tasks", "niah_single", "--lengths", "300"]
    full = eval_cli(tmp_path, *options)
    journal = tmp_path / "out" / runner.JOURNAL
    header, *lines = journal.read_text().splitlines()
    assert json.loads(header)["config"]["samples"] == 2 and len(lines) == 4  # 2 samples x 2 methods
    # interrupted while writing the second sample: its records are lost, one line is cut in the middle
    journal.write_text("\n".join([header, *lines[:2], lines[2][:25]]) + "\n")
    ran = []
    run_sample = runner.run_sample
    monkeypatch.setattr(runner, "run_sample", lambda e, s, m, *a: ran.append(m) or run_sample(e, s, m, *a))
    resumed = eval_cli(tmp_path, *options, "--resume")
    assert sorted(ran) == ["dense", "streaming_llm"]  # only the second sample ran again
    assert resumed["records"][:2] == full["records"][:2] and len(resumed["records"]) == 4
    assert len(journal.read_text().splitlines()) == 5
    argv = ["eval", "--model", "tiny", "--samples", "3", *options, "--out", str(tmp_path / "out"), "--resume"]
    assert main(argv) == 2  # another --samples: another run
    assert "was written by a run with other settings" in capsys.readouterr().err
    assert main([*argv[:-3], "--out", str(tmp_path / "elsewhere"), "--resume"]) == 2
    assert re.search(r"--resume: no .*eval.records.jsonl to resume from", capsys.readouterr().err)
