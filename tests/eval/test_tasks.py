"""Synthetic tasks: deterministic, sized in the model's tokens, answers present, scoring on hand-made cases."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from conftest import SHARED, STORIES, needs_stories
from tokensieve import presets
from tokensieve.eval.haystack import Haystack
from tokensieve.eval.tasks import TASKS, make_sample, parse_task, string_match

ESSAYS = SHARED / "data" / "haystack" / "paul_graham_essays.json"
BYTES = presets.byte_tokenizer()


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, verbose=False)["input_ids"])


def answers(sample) -> list[str]:
    return [a for turn in sample.turns for a in turn.answers]


@pytest.fixture(scope="module")
def stories_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES, local_files_only=True)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_sample_other_seed_other_sample(task):
    a, b = make_sample(task, BYTES, 1024, seed=5), make_sample(task, BYTES, 1024, seed=5)
    assert a == b
    assert make_sample(task, BYTES, 1024, seed=6).prompt() != a.prompt()


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [700, 1500, 4096])
def test_prompt_length_within_two_percent_byte_tokenizer(task, length):
    for seed in range(2):
        sample = make_sample(task, BYTES, length, seed=seed)
        assert abs(n_tokens(BYTES, sample.prompt()) - length) <= 0.02 * length


@needs_stories()
@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [400, 2048])
def test_prompt_length_within_two_percent_stories_tokenizer(stories_tokenizer, task, length):
    for seed in range(2):
        sample = make_sample(task, stories_tokenizer, length, seed=seed)
        assert abs(n_tokens(stories_tokenizer, sample.prompt()) - length) <= 0.02 * length


@pytest.mark.skipif(not ESSAYS.is_file(), reason=f"{ESSAYS} not found (../shared is not beside the repo)")
@pytest.mark.parametrize("task", ["niah_single", "variable_tracking", "two_stage"])
def test_essay_haystack_sizes_and_holds_answers(task):
    haystack = Haystack.from_file(ESSAYS)
    sample = make_sample(task, BYTES, 3000, seed=2, haystack=haystack)
    assert abs(n_tokens(BYTES, sample.prompt()) - 3000) <= 60
    first_filler = sample.context.split("\n\n")[1][:80]
    assert first_filler in haystack.text  # the haystack is the essays' text
    assert all(a in sample.context for a in answers(sample))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_answer_is_in_the_context(task):
    for seed in range(6):
        sample = make_sample(task, BYTES, 900, seed=seed)
        assert answers(sample)
        assert all(a in sample.context for a in answers(sample)), (task, seed)


@pytest.mark.parametrize("spec", ["niah_single:numbers", "niah_single:words", "niah_single:uuids"])
def test_value_kinds(spec):
    (value,) = answers(make_sample(spec, BYTES, 800, seed=1))
    kind = spec.split(":")[1]
    if kind == "numbers":
        assert value.isdigit() and len(value) == 7
    elif kind == "uuids":
        assert str(uuid.UUID(value)) == value
    else:
        assert value.isalpha()
    assert f"special magic {kind} for" in make_sample(spec, BYTES, 800, seed=1).context


@pytest.mark.parametrize(("depth", "low", "high"), [(0.0, 0.0, 0.12), (0.5, 0.4, 0.6), (1.0, 0.9, 1.0)])
def test_needle_depth_is_controlled(depth, low, high):
    sample = make_sample("niah_single", BYTES, 2000, seed=3, depth=depth)
    (value,) = answers(sample)
    at = sample.context.index(value) / len(sample.context)
    assert low <= at <= high


def test_multikey_has_distractors_and_multivalue_asks_every_value():
    multikey = make_sample("niah_multikey", BYTES, 1200, seed=0)
    assert multikey.context.count("special magic words for") == 4 and len(answers(multikey)) == 1
    multivalue = make_sample("niah_multivalue", BYTES, 1200, seed=0)
    key = re.search(r"magic numbers for (\S+)\?", multivalue.turns[0].question).group(1)
    assert multivalue.context.count(f"magic numbers for {key} is") == 4 and len(answers(multivalue)) == 4


def test_variable_chain_statements_appear_in_order():
    sample = make_sample("variable_tracking", BYTES, 1500, seed=4)
    names = answers(sample)
    value = re.search(r"hold the value (\d+)", sample.turns[0].question).group(1)
    positions = [sample.context.index(f"VAR {names[0]} = {value}.")]
    positions += [sample.context.index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:], strict=False)]
    assert positions == sorted(positions) and len(names) == 5


def test_two_stage_answer_is_the_colour_at_the_sum():
    for seed in range(4):
        sample = make_sample("two_stage", BYTES, 2000, seed=seed)
        a, b = map(int, re.search(r"t = (\d+) \+ (\d+)\.", sample.turns[0].question).groups())
        table = dict(re.findall(r"(\d+): '(\w+)'", sample.context))
        assert 4 <= len(table) <= 200
        assert table[str(a + b)] == answers(sample)[0]


def test_multi_turn_feeds_answers_back():
    sample = make_sample("multi_turn", BYTES, 1000, seed=1)
    assert len(sample.turns) == 3
    second = sample.prompt(["first answer"])
    assert second.startswith(sample.context) and "first answer" in second
    assert second.endswith(sample.turns[1].question)
    with pytest.raises(ValueError, match="3 turns"):
        sample.prompt(["a", "b", "c"])


def test_scoring_on_hand_made_cases():
    assert string_match("The special magic number is 4829137.", ["4829137"]) == 1.0
    assert string_match("4829137 and then nothing", ["4829137", "1111111"]) == 0.5
    assert string_match("48291370", ["4829137"]) == 0.0  # a longer number is not the answer
    assert string_match("it is covered", ["red"]) == 0.0
    assert string_match("RED, I think", ["red"]) == 1.0
    assert string_match("no idea", ["abc", "def"]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        string_match("x", [])


def test_sample_score_uses_the_turns_answers():
    sample = make_sample("niah_multiquery", BYTES, 1500, seed=2)
    values = answers(sample)
    assert sample.score(0, " ".join(values[:3])) == 0.75


def test_bad_requests_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        parse_task("nope")
    with pytest.raises(ValueError, match="not 'uuids'"):
        parse_task("two_stage:uuids")
    with pytest.raises(ValueError, match="ask for a longer length"):
        make_sample("niah_multiquery", BYTES, 128)
    with pytest.raises(ValueError, match="depth"):
        make_sample("niah_single", BYTES, 800, depth=1.5)
    bad = tmp_path / "h.json"
    bad.write_text(json.dumps({"content": "x"}))
    with pytest.raises(ValueError, match="'text'"):
        Haystack.from_file(bad)
    with pytest.raises(FileNotFoundError):
        Haystack.from_file(tmp_path / "missing.json")


def test_haystack_from_json_file(tmp_path):
    path = tmp_path / "hay.json"
    path.write_text(json.dumps({"text": "Zebras graze quietly on the plain. " * 200}))
    sample = make_sample("niah_single", BYTES, 1000, seed=0, haystack=Haystack.from_file(path))
    assert "Zebras graze quietly" in sample.context
    assert abs(n_tokens(BYTES, sample.prompt()) - 1000) <= 20


def test_haystack_from_a_directory_of_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("Second essay. " * 60)
    (tmp_path / "a.md").write_text("First   essay.\n" * 60)
    haystack = Haystack.from_file(tmp_path)
    assert haystack.text.startswith("First essay. First essay.") and "Second essay." in haystack.text


@pytest.mark.parametrize("name", ["questions.jsonl", "data.csv"])
def test_haystack_refuses_what_it_cannot_read_as_prose(tmp_path, name):
    (tmp_path / name).write_text('{"input": "q", "outputs": ["the answer"]}\n' * 100)
    with pytest.raises(ValueError, match=rf"--haystack .*{name}: cannot read \.\w+ files as prose"):
        Haystack.from_file(tmp_path / name)
    (tmp_path / "essay.txt").write_text("Prose. " * 200)
    with pytest.raises(ValueError, match=rf"must hold only text files \(\.txt, \.md\); it holds {name}"):
        Haystack.from_file(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 300)
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        Haystack.from_file(tmp_path / "latin1.txt")
