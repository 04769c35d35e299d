"""Batching: every sequence of a batch generates exactly what it generates alone, joining and leaving."""

from __future__ import annotations

import pytest
import torch

import tokensieve
from conftest import PRUNING, random_prompt
from tokensieve.engine.scheduler import Scheduler
from tokensieve.methods import METHODS

PROMPTS = [random_prompt(n, seed=60 + n) for n in (150, 320, 90, 260)]
NEW = [12, 5, 9, 7]


@pytest.mark.parametrize("spec", [*(PRUNING[name] for name in sorted(METHODS)), "sliminfer+omnikv(budget=32)"])
def test_each_sequence_of_a_batch_equals_it_alone(deep_engine, spec):
    """Two places for four sequences of different lengths and lengths of output: they join and leave."""
    alone = [
        deep_engine.generate(p, max_new_tokens=n, method=spec).token_ids for p, n in zip(PROMPTS, NEW, strict=True)
    ]
    batched = deep_engine.generate(PROMPTS, max_new_tokens=NEW, method=spec, max_batch=2)
    assert [g.token_ids for g in batched] == alone
    assert [g.stats.new_tokens for g in batched] == NEW


@pytest.mark.parametrize("chunk", [None, 100])
def test_first_prompts_prefilled_together_decide_and_generate_as_alone(deep_engine, chunk):
    """Prompts admitted together share one prefill pass (projections and MLP over all their rows, in chunks
    that span two prompts when `prefill_chunk` is set), each with its own method's decisions."""
    specs = [PRUNING["sliminfer"], PRUNING["lazyllm"], "dense", PRUNING["omnikv"]]
    engine = tokensieve.load(deep_engine.model.hf, tokenizer=deep_engine.tokenizer, prefill_chunk=chunk)
    scheduler = Scheduler(engine, max_batch=4, prefill_tokens=300)
    for prompt, new, spec in zip(PROMPTS, NEW, specs, strict=True):
        scheduler.submit(prompt, max_new_tokens=new, method=spec)
    generations = scheduler.run()
    # 150 and 90 tokens fit 300 together; 320 and 260 run alone
    assert scheduler.stats.prefill_batch_sizes == [2, 1, 1]
    for prompt, new, spec, generation in zip(PROMPTS, NEW, specs, generations, strict=True):
        alone = deep_engine.generate(prompt, max_new_tokens=new, method=spec)
        assert generation.token_ids == alone.token_ids
        assert generation.stats.prefill_tokens_per_layer == alone.stats.prefill_tokens_per_layer
        assert generation.stats.prefill_mlp_tokens_per_layer == alone.stats.prefill_mlp_tokens_per_layer


def test_a_joint_prefill_gives_each_prompt_its_logits_alone(deep_engine):
    from tokensieve.engine import prefill_together

    sessions = [deep_engine.start(p, method=PRUNING["sliminfer"], defer_prefill=True) for p in PROMPTS[:3]]
    prefill_together(sessions)
    assert all(s.prefill_started and s.pending_tokens == sum(map(len, PROMPTS[:3])) for s in sessions)
    assert not sessions[1].advance_prefill(3) and sessions[0].advance_prefill(100)  # one pass for all
    assert sessions[1].advance_prefill(0) and sessions[2].advance_prefill(0)
    for session, prompt in zip(sessions, PROMPTS, strict=False):
        alone = deep_engine.start(prompt, method=PRUNING["sliminfer"])
        torch.testing.assert_close(session._logits, alone._logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="has not started"):
        prefill_together(sessions)


def test_sequences_join_a_running_batch_between_steps(deep_engine):
    scheduler = Scheduler(deep_engine, max_batch=4)
    first = [scheduler.submit(p, max_new_tokens=10) for p in PROMPTS[:2]]
    for _ in range(4):
        scheduler.step()
    later = [scheduler.submit(p, max_new_tokens=10) for p in PROMPTS[2:]]
    generations = scheduler.run()
    for index, prompt in zip(first + later, PROMPTS, strict=True):
        assert generations[index].token_ids == deep_engine.generate(prompt, max_new_tokens=10).token_ids
    assert max(scheduler.stats.batch_sizes) == 4 and scheduler.stats.tokens_per_s > 0


@pytest.mark.parametrize("spec", ["dense", PRUNING["sliminfer"], PRUNING["lazyllm"], PRUNING["omnikv"]])
def test_a_long_prefill_runs_between_decode_steps_and_changes_nothing(deep_engine, spec):
    scheduler = Scheduler(deep_engine, max_batch=2, prefill_tokens=64)
    short = scheduler.submit(PROMPTS[2], max_new_tokens=24, method=spec)
    scheduler.step()  # nothing decodes yet: its whole prefill runs at once
    assert short in scheduler.running
    long_prompt = random_prompt(600, seed=9)
    late = scheduler.submit(long_prompt, max_new_tokens=6, method=spec)
    steps_while_prefilling = 0
    scheduler.step()  # admits it: one layer (64 tokens' worth of a 600-token prompt) per step
    while late in scheduler.prefilling:
        before = len(scheduler.stats.batch_sizes)
        scheduler.step()
        steps_while_prefilling += len(scheduler.stats.batch_sizes) - before
    layers = deep_engine.model.spec.num_layers
    assert steps_while_prefilling >= layers - 2  # the short one decoded between the long one's layers
    generations = scheduler.run()
    assert generations[short].token_ids == deep_engine.generate(PROMPTS[2], max_new_tokens=24, method=spec).token_ids
    alone = deep_engine.generate(long_prompt, max_new_tokens=6, method=spec)
    assert generations[late].token_ids == alone.token_ids
    assert generations[late].stats.prefill_tokens_per_layer == alone.stats.prefill_tokens_per_layer


def test_a_sequence_that_stops_early_leaves_the_others_untouched(deep_engine):
    full = deep_engine.generate(PROMPTS[0], max_new_tokens=20)
    stop = full.text[3:5]
    batched = deep_engine.generate(PROMPTS[:2], max_new_tokens=20, stop=[[stop], None])
    assert batched[0].finish_reason == "stop" and batched[0].text == full.text[: full.text.index(stop)]
    assert batched[1].token_ids == deep_engine.generate(PROMPTS[1], max_new_tokens=20).token_ids


def test_a_cancelled_sequence_frees_its_place_and_memory(deep_engine):
    scheduler = Scheduler(deep_engine, max_batch=2)
    a, b = (scheduler.submit(p, max_new_tokens=30) for p in PROMPTS[:2])
    scheduler.step()
    session = scheduler.running[a].stream.session
    scheduler.cancel(a)
    assert a not in scheduler.running and session.closed
    assert scheduler.done[a].finish_reason == "cancelled"
    assert scheduler.run()[1].token_ids == deep_engine.generate(PROMPTS[1], max_new_tokens=30).token_ids


def test_memory_admission_waits_for_room_and_refuses_what_never_fits(deep_engine):
    spec = deep_engine.model.spec
    one = 320 * spec.num_layers * spec.kv_bytes_per_token(torch.float32)
    scheduler = Scheduler(deep_engine, max_batch=4, max_kv_bytes=int(1.5 * one))
    for prompt in (PROMPTS[1], PROMPTS[3]):  # 320 + 260 tokens: not both within 1.5 x 320
        scheduler.submit(prompt, max_new_tokens=4)
    scheduler.run()
    assert scheduler.stats.batch_sizes and max(scheduler.stats.batch_sizes) == 1  # the second waited
    with pytest.raises(ValueError, match="more than max_kv_bytes"):
        Scheduler(deep_engine, max_kv_bytes=one // 2).submit(PROMPTS[1])


@pytest.mark.parametrize(
    ("prompts", "settings", "message"),
    [
        ([PROMPTS[0], PROMPTS[1], ""], {}, "prompt 2 of the batch: the prompt is empty"),
        (PROMPTS[:2], {"max_new_tokens": [4, 5, 6]}, "max_new_tokens has 3 entries for 2 prompts"),
        (PROMPTS[:2], {"seed": [1]}, "seed has 1 entries for 2 prompts"),
        (PROMPTS[:2], {"max_new_tokens": [4, 0]}, "prompt 1 of the batch: max_new_tokens"),
    ],
)
def test_bad_batch_input_names_the_prompt(deep_engine, prompts, settings, message):
    with pytest.raises((ValueError, TypeError), match=message):
        deep_engine.generate(prompts, **settings)


def test_dense_batch_equals_transformers_batched_generate_with_left_padding(deep_engine):
    prompts = [p[:n] for p, n in zip(PROMPTS, (40, 64, 25, 50), strict=True)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = deep_engine.model.hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    theirs = out[:, width:].tolist()
    ours = [g.token_ids for g in deep_engine.generate(prompts, max_new_tokens=8, stop=None)]
    eos = deep_engine.eos_ids
    for mine, hf in zip(ours, theirs, strict=True):
        assert mine == hf[: len(mine)] and (len(mine) == 8 or mine[-1] in eos)


def test_batch_stream_yields_indexed_pieces_then_the_generations(deep_engine):
    stream = deep_engine.stream(PROMPTS[:3], max_new_tokens=NEW[:3], max_batch=2)
    pieces: dict[int, str] = {}
    for index, piece in stream:
        pieces[index] = pieces.get(index, "") + piece
    expected = deep_engine.generate(PROMPTS[:3], max_new_tokens=NEW[:3])
    assert [g.token_ids for g in stream.generations] == [g.token_ids for g in expected]
    assert [pieces.get(i, "") for i in range(3)] == [g.text for g in expected]


def test_cli_generates_a_batch_from_prompt_files_and_jsonl(tmp_path, capsys):
    from tokensieve.cli import main

    (tmp_path / "a.txt").write_text("first prompt")
    (tmp_path / "b.txt").write_text("second prompt")
    (tmp_path / "p.jsonl").write_text('"one"\n{"prompt": "two"}\n{"prompt_ids": [1, 2, 3]}\n')
    files = ["--prompt-file", str(tmp_path / "a.txt"), "--prompt-file", str(tmp_path / "b.txt")]
    assert main(["generate", "--model", "tiny", *files, "--max-new-tokens", "3", "--stats"]) == 0
    out = capsys.readouterr().out
    assert "--- prompt 0" in out and "--- prompt 1" in out and out.count("prompt tokens") == 2
    assert main(["generate", "--model", "tiny", "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "2"]) == 0
    assert "--- prompt 2" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('"fine"\n{"nope": 1}\n')
    assert main(["generate", "--model", "tiny", "--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert "line 2" in capsys.readouterr().err


def test_a_session_added_with_a_deferred_prefill_joins_between_layers_and_stays_open(deep_engine):
    """What the server does: it opens the session (a fresh one deferred, or a retained one) and adds it."""
    scheduler = Scheduler(deep_engine, max_batch=2, prefill_tokens=64)
    running = scheduler.submit(PROMPTS[2], max_new_tokens=24)
    scheduler.step()
    session = deep_engine.start(PROMPTS[1], defer_prefill=True)
    added = scheduler.add(session, max_new_tokens=6)
    assert added in scheduler.prefilling
    while added in scheduler.prefilling:
        scheduler.step()
    assert len(scheduler.stats.batch_sizes) > 4  # the running sequence decoded between the added one's layers
    generations = scheduler.run()
    assert generations[added].token_ids == deep_engine.generate(PROMPTS[1], max_new_tokens=6).token_ids
    assert generations[running].token_ids == deep_engine.generate(PROMPTS[2], max_new_tokens=24).token_ids
    assert not session.closed  # its caller keeps it (e.g. for the next turn)
    with pytest.raises(ValueError, match="temperature"):
        scheduler.add(deep_engine.start(PROMPTS[0]), max_new_tokens=2, temperature=-1.0)


@pytest.mark.parametrize("spec", ["dense", PRUNING["sliminfer"], PRUNING["omnikv"], PRUNING["h2o"]])
def test_a_deferred_later_turn_runs_between_decode_steps_and_changes_nothing(deep_engine, spec):
    """A retained conversation's next turn (`extend(..., defer=True)`, what the server does) is computed a
    few layers at a time between the running sequences' decode steps, with the tokens of an extension in one go."""
    turn = random_prompt(400, seed=11)

    def conversation(defer: bool):
        session = deep_engine.start(PROMPTS[0], method=spec)
        session.generate(max_new_tokens=4)
        session.extend(turn, defer=defer)
        return session

    direct = conversation(defer=False).generate(max_new_tokens=6)
    scheduler = Scheduler(deep_engine, max_batch=2, prefill_tokens=64)
    running = scheduler.submit(PROMPTS[2], max_new_tokens=30, method=spec)
    scheduler.step()
    session = conversation(defer=True)
    assert session.prefilling and session.pending_tokens == len(turn) + 1  # the turn and the reply's last token
    with pytest.raises(RuntimeError, match="still under way"):
        session.generate(max_new_tokens=1)
    added = scheduler.add(session, max_new_tokens=6)
    decoded_before = len(scheduler.stats.batch_sizes)
    while added in scheduler.prefilling:
        scheduler.step()
    assert len(scheduler.stats.batch_sizes) - decoded_before >= deep_engine.model.spec.num_layers - 2
    generations = scheduler.run()
    assert generations[added].token_ids == direct.token_ids
    assert generations[added].stats.prompt_tokens == direct.stats.prompt_tokens == len(turn) + 1
    assert generations[added].stats.prefill_tokens_per_layer == direct.stats.prefill_tokens_per_layer
    assert generations[running].token_ids == deep_engine.generate(PROMPTS[2], max_new_tokens=30, method=spec).token_ids
