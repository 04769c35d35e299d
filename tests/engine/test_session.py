"""Sessions: multi-turn `extend`, continuing generation, streams as objects, chunked prefill, threads."""

from __future__ import annotations

import threading

import pytest
import torch

import tokensieve
from conftest import PRUNING, random_prompt
from tokensieve import presets
from tokensieve.engine import Scheduler
from tokensieve.methods import METHODS

TURNS = [random_prompt(90, seed=21), random_prompt(40, seed=22)[1:], random_prompt(25, seed=23)[1:]]
CHAT_TEMPLATE = "".join(
    [
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}",
        "{% if add_generation_prompt %}[assistant]{% endif %}",
    ]
)


@pytest.fixture(scope="module")
def engine() -> tokensieve.Engine:
    model, tok = presets.build("tiny", seed=5, max_positions=1024)
    return tokensieve.load(model, tokenizer=tok)


def conversation(engine, method="dense", new_tokens=6, **start):
    """Three turns through one session; returns the session and each turn's generation."""
    session = engine.start(TURNS[0], method=method, **start)
    gens = [session.generate(max_new_tokens=new_tokens)]
    for turn in TURNS[1:]:
        session.extend(turn)
        gens.append(session.generate(max_new_tokens=new_tokens))
    return session, gens


def test_dense_extend_equals_one_generate_over_the_whole_conversation(engine):
    """Invariant 8: a session extended turn by turn is one prefill of the whole conversation (fp32, greedy)."""
    session, gens = conversation(engine)
    history: list[int] = []
    for turn, gen in zip(TURNS, gens, strict=True):
        history += turn
        assert engine.generate(history, max_new_tokens=6).token_ids == gen.token_ids
        history += gen.token_ids
    assert session.tokens == history


def test_extend_computes_only_the_new_tokens_and_reports_the_reuse(engine):
    session, gens = conversation(engine)
    layers = engine.model.spec.num_layers
    first, second = gens[0].stats, gens[1].stats
    assert first.prompt_tokens == first.context_tokens == len(TURNS[0]) and first.reused_tokens == 0
    # The last sampled token of turn 1 had no KV yet: it is computed with turn 2.
    assert second.prompt_tokens == len(TURNS[1]) + 1
    assert second.context_tokens == len(TURNS[0]) + 6 + len(TURNS[1])
    assert second.reused_tokens == len(TURNS[0]) + 5
    assert second.prefill_tokens_per_layer == [len(TURNS[1]) + 1] * layers
    assert second.unseen_tokens_per_layer == [0] * layers  # dense keeps everything
    stats = session.stats
    assert [call.new_tokens for call in stats.calls] == [6, 6, 6]
    assert stats.computed_tokens == len(session.tokens) - 1  # the last sampled token waits for the next call
    assert stats.kv_bytes_device == stats.computed_tokens * layers * engine.model.spec.kv_bytes_per_token(torch.float32)
    assert stats.kv_bytes_reserved >= stats.kv_bytes_device


def test_generate_again_continues_where_the_last_call_stopped(engine):
    session = engine.start(TURNS[0])
    parts = session.generate(max_new_tokens=5).token_ids + session.generate(max_new_tokens=7).token_ids
    assert parts == engine.generate(TURNS[0], max_new_tokens=12).token_ids


def test_stream_is_an_object_with_its_generation_and_can_be_cancelled(engine):
    session = engine.start(TURNS[0])
    stream = session.stream(max_new_tokens=20)
    next(stream)
    stream.close()
    assert stream.generation.finish_reason == "cancelled"
    assert list(stream) == []
    rest = session.generate(max_new_tokens=4)  # the session goes on from the cancelled call's tokens
    done = stream.generation.token_ids + rest.token_ids
    assert done == engine.generate(TURNS[0], max_new_tokens=len(done)).token_ids


def test_a_new_call_cancels_this_threads_unfinished_stream(engine):
    session = engine.start(TURNS[0])
    stream = session.stream(max_new_tokens=20)
    next(stream)
    session.extend(TURNS[1])
    assert stream.generation.finish_reason == "cancelled"
    history = list(session.tokens)
    assert session.generate(max_new_tokens=3).token_ids == engine.generate(history, max_new_tokens=3).token_ids


def test_another_thread_using_a_busy_session_gets_a_clear_error(engine):
    session = engine.start(TURNS[0])
    stream = session.stream(max_new_tokens=20)
    next(stream)
    errors: list[Exception] = []

    def intrude():
        try:
            session.generate(max_new_tokens=2)
        except RuntimeError as err:
            errors.append(err)

    worker = threading.Thread(target=intrude)
    worker.start()
    worker.join()
    assert errors and "another thread" in str(errors[0])
    list(stream)  # the owner's stream is untouched
    assert stream.generation.finish_reason == "length" and len(stream.generation.token_ids) == 20


def test_threads_with_their_own_sessions_on_one_engine_get_correct_tokens(engine):
    prompts = [random_prompt(60 + 10 * i, seed=30 + i) for i in range(4)]
    expected = [engine.generate(p, max_new_tokens=10).token_ids for p in prompts]
    results: dict[int, list[int]] = {}

    def work(i: int):
        results[i] = engine.generate(prompts[i], max_new_tokens=10).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == expected


def test_closed_session_is_a_clear_error(engine):
    session = engine.start(TURNS[0])
    session.close()
    assert session.closed
    with pytest.raises(RuntimeError, match="closed"):
        session.generate(max_new_tokens=2)
    with pytest.raises(RuntimeError, match="closed"):
        session.extend(TURNS[1])


def test_chunked_prefill_equals_one_shot(engine):
    """Dense: logits within 1e-4 (fp32) and identical greedy tokens, for chunks that do and don't divide."""
    prompt = random_prompt(300, seed=40)
    full = engine.next_token_logits(prompt, [5, 6, 7])
    for chunk in (1, 64, 97, 300, 1000):
        chunked = tokensieve.load(engine.model.hf, tokenizer=engine.tokenizer, prefill_chunk=chunk)
        torch.testing.assert_close(chunked.next_token_logits(prompt, [5, 6, 7]), full, atol=1e-4, rtol=0)
        assert (
            chunked.generate(prompt, max_new_tokens=12).token_ids
            == engine.generate(prompt, max_new_tokens=12).token_ids
        )


def test_chunked_extension_equals_one_shot(engine):
    _, whole = conversation(engine)
    _, chunked = conversation(engine, prefill_chunk=16)
    assert [g.token_ids for g in chunked] == [g.token_ids for g in whole]


def test_chat_session_renders_each_turn_through_the_template():
    model, tok = presets.build("tiny", seed=5, max_positions=1024)
    tok.chat_template = CHAT_TEMPLATE
    engine = tokensieve.load(model, tokenizer=tok)
    session = engine.start("hello there", chat=True)
    reply = session.generate(max_new_tokens=4, stop=None)
    session.extend("and now?", chat=True)
    rendered = engine.render_chat(
        [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": reply.text},
         {"role": "user", "content": "and now?"}]
    )  # fmt: skip
    if rendered[: len(session.tokens)] == session.tokens:  # the reply re-encodes to its own tokens
        assert session.tokens == rendered
        assert session.generate(max_new_tokens=3).token_ids == engine.generate(rendered, max_new_tokens=3).token_ids
    with pytest.raises(ValueError, match="started with chat=False"):
        engine.start("plain").extend("more", chat=True)
    with pytest.raises(ValueError, match="as text"):
        engine.start([1, 2, 3], chat=True)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_prefill_chunk_is_a_clear_error(engine, bad):
    with pytest.raises(ValueError, match="prefill_chunk"):
        engine.start(TURNS[0], prefill_chunk=bad)


def test_buffers_grow_with_the_session_instead_of_reserving_max_new_tokens(engine):
    """Memory that tells the truth: asking for many new tokens reserves nothing up front."""
    prompt = random_prompt(500, seed=41)
    short = engine.generate(prompt, max_new_tokens=2, stop=None).stats
    long = engine.start(prompt).stream(max_new_tokens=500)
    next(long)
    long.close()
    assert long.generation.stats.kv_bytes_reserved == short.kv_bytes_reserved
    assert short.kv_bytes_reserved <= 1.15 * short.kv_bytes_device


def test_windowed_layers_keep_only_their_window_under_dense():
    """A sliding-window layer's KV older than its window is freed; the tokens stay those of a full cache."""
    from conftest import FAMILIES

    model, tok = presets.build(FAMILIES["mistral-sliding"], seed=2)
    engine = tokensieve.load(model, tokenizer=tok)
    window = engine.model.spec.layer_windows[0]
    prompt = random_prompt(6 * window, seed=50)
    session = engine.start(prompt)
    tokens = session.generate(max_new_tokens=3 * window, stop=None).token_ids
    assert len(tokens) > window // 4
    assert all(len(kv) <= window + max(16, window // 8) for kv in session.kv)
    kept_all = engine.start(prompt, method="snapkv(budget=1.0)")
    assert kept_all.generate(max_new_tokens=3 * window).token_ids == tokens  # a policy that trims nothing
    assert len(kept_all.kv[0]) == len(prompt) + len(tokens) - 1


def test_a_deferred_prefill_runs_a_few_layers_at_a_time_to_the_same_result(deep_engine):
    prompt = random_prompt(200, seed=4)
    session = deep_engine.start(prompt, method="omnikv(budget=32)", defer_prefill=True)
    assert session.prefilling
    with pytest.raises(RuntimeError, match="prefill is still under way"):
        session.generate(max_new_tokens=2)
    calls = 1
    while not session.advance_prefill(5):  # 12 layers: 5, 5, then the last 2
        calls += 1
    assert calls == 3 and not session.prefilling
    expected = deep_engine.start(prompt, method="omnikv(budget=32)").generate(max_new_tokens=8)
    got = session.generate(max_new_tokens=8)
    assert got.token_ids == expected.token_ids
    assert got.stats.prefill_tokens_per_layer == expected.stats.prefill_tokens_per_layer and got.stats.ttft_s > 0


FORKED = ["dense", "sliminfer+omnikv(budget=32)", *(PRUNING[name] for name in sorted(METHODS))]


@pytest.mark.parametrize("spec", FORKED)
def test_a_forked_session_goes_on_exactly_as_the_original_and_apart_from_it(deep_engine, spec):
    """`fork` copies every piece of a session's state (KV, selections, host stores, aux caches): the twin
    generates what the original would, and what either does later leaves the other untouched."""
    prompt, turn = random_prompt(260, seed=21), random_prompt(40, seed=22)
    reference = deep_engine.start(prompt, method=spec)
    reference.generate(max_new_tokens=3)
    expected = reference.generate(max_new_tokens=6)
    session = deep_engine.start(prompt, method=spec)
    session.generate(max_new_tokens=3)
    records = [(kv.runs(), kv.host_positions.tolist()) for kv in session.kv]  # each entry's kind, host positions
    twin = session.fork()
    assert [(kv.runs(), kv.host_positions.tolist()) for kv in twin.kv] == records
    twin.extend(turn)  # the twin goes its own way first ...
    twin.generate(max_new_tokens=4)
    assert [(kv.runs(), kv.host_positions.tolist()) for kv in session.kv] == records
    ours = session.generate(max_new_tokens=6)  # ... and the original continues as if it had never been forked
    assert ours.token_ids == expected.token_ids
    assert ours.stats.decode_keys_per_layer == expected.stats.decode_keys_per_layer
    second, alone = session.fork(), session.fork().generate(max_new_tokens=5)
    scheduler = Scheduler(deep_engine, max_batch=2)  # the original and a twin in one batch: each its own stats
    for member in (session, second):
        scheduler.add(member, max_new_tokens=5)
    for generation in scheduler.run():
        assert generation.token_ids == alone.token_ids
        assert generation.stats.host_bytes_loaded_per_step == alone.stats.host_bytes_loaded_per_step
    assert twin.tokens[: len(prompt) + 3] == session.tokens[: len(prompt) + 3] and len(twin.tokens) == 260 + 47


def test_fork_needs_a_session_between_calls(deep_engine):
    session = deep_engine.start(random_prompt(50, seed=3), defer_prefill=True)
    with pytest.raises(RuntimeError, match="between calls"):
        session.fork()
    session.advance_prefill(100)
    stream = session.stream(max_new_tokens=4)
    next(stream)
    with pytest.raises(RuntimeError, match="between calls"):
        session.fork()
    stream.close()
    assert session.fork().generate(max_new_tokens=2).stats.new_tokens == 2
