"""The testbed: the embedded model answers a needle task, the tokenizer round-trips, train.py runs."""

from __future__ import annotations

import json

import pytest
import torch

import tokensieve
from tokensieve.eval.tasks import make_sample
from tokensieve.testbed import MODEL_DIR, model_path
from tokensieve.testbed.data import ANSWER, TEXT, task_example
from tokensieve.testbed.tokenizer import train_tokenizer
from tokensieve.testbed.train import TrainConfig, main

needs_model = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").is_file(), reason=f"the embedded testbed model is not in {MODEL_DIR}"
)


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_tokenizer(vocab_size=600, samples_per_task=3)


@needs_model
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_embedded_model_answers_a_short_needle_task_under_dense(seed):
    # Word values: the embedded model retrieves them (100% on held-out seeds up to 1K tokens); 7-digit numbers
    # it does not yet (see docs/testbed.md).
    engine = tokensieve.load(model_path(), device="cpu")
    sample = make_sample("niah_single:words", engine.tokenizer, 256, seed=seed)
    generation = engine.generate(sample.prompt(), max_new_tokens=sample.max_new_tokens)
    assert sample.score(0, generation.text) == 1.0, generation.text
    assert generation.finish_reason == "eos"  # it stops after the answer


def test_model_path_names_the_missing_directory(monkeypatch, tmp_path):
    monkeypatch.setattr("tokensieve.testbed.MODEL_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="absent"):
        model_path()


def test_tokenizer_round_trips_text_and_adds_bos(small_tokenizer):
    text = "The special magic uuid for amber-badger is: 3f2a9c1e-0b7d-4e2a-9f00-12ab34cd56ef.\n\nÉté, naïve — ok?"
    ids = small_tokenizer(text)["input_ids"]
    assert ids[0] == small_tokenizer.bos_token_id
    assert small_tokenizer.decode(ids, skip_special_tokens=True) == text
    # The suite's own words are single tokens, so prompts are short in tokens.
    assert len(small_tokenizer("the lighthouse keeper", add_special_tokens=False)["input_ids"]) <= 4


def test_task_example_teaches_the_answer_and_eos(small_tokenizer):
    example = task_example(small_tokenizer, "multi_turn:numbers", 256, seed=1_000_000)
    answers = [t for t, r in zip(example.targets, example.roles, strict=True) if r == ANSWER]
    assert answers.count(small_tokenizer.eos_token_id) == 3  # every turn ends with EOS
    assert example.roles.count(TEXT) > 200
    text = small_tokenizer.decode([t for t in answers if t != small_tokenizer.eos_token_id])
    sample = make_sample("multi_turn:numbers", small_tokenizer, 256, seed=1_000_000)
    assert all(answer in text for turn in sample.turns for answer in turn.answers)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TINY = ["--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2", "--tokens-per-step", "256"]


def test_curriculum_stages_with_a_list_of_lengths_draw_one_per_step():
    cfg = TrainConfig(steps=100, curriculum=[(0.5, 64), (1.0, [128, 256])])
    assert [cfg.length_at(step) for step in range(50)] == [64] * 50
    late = [cfg.length_at(step) for step in range(50, 100)]
    assert set(late) == {128, 256}
    assert late == [cfg.length_at(step) for step in range(50, 100)]  # drawn from the seed
    assert cfg.stage_at(49) == 0 and cfg.stage_at(50) == 1 and cfg.stage_at(1000) == 1


def test_train_runs_two_tiny_steps_and_writes_its_log(tmp_path, restore_threads):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"curriculum": [[1.0, 128]], "tokenizer_samples": 2, "vocab_size": 600}))
    tiny = TINY
    main(
        [
            "--config",
            str(config),
            "--steps",
            "2",
            "--out",
            str(tmp_path),
            "--quiet",
            "--no-plot",
            "--log-every",
            "1",
            *tiny,
        ]
    )
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["answer_loss"] > 0 for r in log)
    assert "validation" in log[-1]
    engine = tokensieve.load(tmp_path, device="cpu")  # the output is a loadable Hugging Face directory
    assert engine.model.spec.num_layers == 2

    # --init continues from that checkpoint (same tokenizer); a different shape is a clear error
    more = ["--config", str(config), "--steps", "1", "--quiet", "--no-plot", "--init", str(tmp_path), *tiny]
    main([*more, "--out", str(tmp_path / "continued")])
    continued = tokensieve.load(tmp_path / "continued", device="cpu")
    assert continued.tokenizer.get_vocab() == engine.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="different shape"):
        main([*more, "--out", str(tmp_path / "wide"), "--hidden-size", "64"])
