"""Multi-turn KV reuse through a live server: a 3-turn chat continues one session and computes only new tokens."""

from __future__ import annotations

import pytest

from tokensieve.serve.prompts import encode_piece

from .conftest import MODEL, live_server

TURNS = ["Tell me about foxes.", "And their dens?", "What do they eat?"]


def _chat(client, method: str, reuse: bool = True):
    """Run the 3-turn chat; per turn: (reply text, the tokensieve extra field, usage)."""
    messages, turns = [], []
    for question in TURNS:
        messages.append({"role": "user", "content": question})
        reply = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,
            extra_body={"tokensieve": {"method": method, "reuse": reuse}},
        )
        text = reply.choices[0].message.content
        turns.append((text, reply.model_extra["tokensieve"], reply.usage))
        messages.append({"role": "assistant", "content": text})
    return turns


@pytest.mark.parametrize("method", ["dense", "omnikv(budget=0.5)"])
def test_a_three_turn_chat_reuses_the_session_and_computes_only_the_new_turn(live, method):
    turns = _chat(live.client(), method)
    assert [extra["prefix_reused"] for _, extra, _ in turns] == [False, True, True]
    for (_, _, previous_usage), (_, extra, usage) in zip(turns, turns[1:], strict=False):
        # reused: the whole previous conversation but its last sampled token (which had no KV yet)
        assert extra["reused_tokens"] == previous_usage.total_tokens - 1
        computed = usage.prompt_tokens - previous_usage.total_tokens + 1
        assert extra["computed_tokens"] == computed
        assert extra["stats"]["prefill_tokens_per_layer"][0] == computed


def test_dense_reuse_gives_the_tokens_of_one_generate_over_the_conversation(live):
    """Each reused turn says exactly what one in-process `generate` over the conversation's ids says: the
    previous turns' tokens as generated, then the new suffix (the server's rule, docs/serve.md)."""
    turns = _chat(live.client(), "dense")
    tokenizer, messages = live.reference.tokenizer, []
    ids, seen_text = [], ""
    for question, (text, _, usage) in zip(TURNS, turns, strict=True):
        messages.append({"role": "user", "content": question})
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids += encode_piece(tokenizer, rendered[len(seen_text) :])
        expected = live.reference.generate(ids, max_new_tokens=12)
        assert text == expected.text
        assert usage.prompt_tokens == len(ids)
        ids += expected.token_ids
        seen_text = rendered + expected.text
        messages.append({"role": "assistant", "content": text})


def test_reuse_off_recomputes_every_turn_and_retains_nothing(live):
    retained = live.metric("tokensieve_sessions_retained")
    turns = _chat(live.client(), "dense", reuse=False)
    assert [extra["prefix_reused"] for _, extra, _ in turns] == [False, False, False]
    assert live.metric("tokensieve_sessions_retained") == retained
    for _, extra, usage in turns:
        assert extra["computed_tokens"] == usage.prompt_tokens


def test_reuse_continues_only_the_same_method(live):
    client = live.client()
    first = _chat(client, "dense")[0]
    messages = [
        {"role": "user", "content": TURNS[0]},
        {"role": "assistant", "content": first[0]},
        {"role": "user", "content": TURNS[1]},
    ]
    other = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, extra_body={"tokensieve": {"method": "lazyllm"}}
    )
    assert other.model_extra["tokensieve"]["prefix_reused"] is False


def test_a_completion_never_continues_a_chat_session(live):
    """The chat's ids carry no BOS (the template decides) where a completion's do: their texts never mix."""
    client = live.client()
    messages = [{"role": "user", "content": "A chat turn."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    rendered = live.reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    follow = rendered + reply.choices[0].message.content + " more"
    completion = client.completions.create(model=MODEL, prompt=follow, max_tokens=2, temperature=0)
    assert completion.model_extra["tokensieve"]["prefix_reused"] is False
    assert completion.choices[0].text == live.reference.generate(follow, max_new_tokens=2).text


def test_token_id_prompts_continue_a_session(live):
    client = live.client()
    ids = live.reference.encode("Once upon a time")
    first = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    generated = live.reference.generate(ids, max_new_tokens=6).token_ids
    follow = ids + generated + live.reference.encode(" then", special_tokens=False)
    second = client.completions.create(model=MODEL, prompt=follow, max_tokens=6, temperature=0)
    assert first.model_extra["tokensieve"]["prefix_reused"] is False
    assert second.model_extra["tokensieve"]["prefix_reused"] is True
    assert second.model_extra["tokensieve"]["computed_tokens"] == len(" then") + 1
    assert second.choices[0].text == live.reference.generate(follow, max_new_tokens=6).text


def test_the_memory_cap_drops_the_least_recently_used_session(live):
    prompts = [live.reference.encode(f"conversation {i} " * 4) for i in range(4)]  # token ids: kept whatever the text
    probe = live.reference.start(prompts[0])
    probe.generate(max_new_tokens=4)
    one = probe.stats.kv_bytes_device + probe.stats.kv_bytes_host
    probe.close()
    with live_server(session_bytes=int(one * 1.5)) as server:  # room for one of these conversations
        client = server.client()
        for ids in prompts:
            client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
        assert server.metric("tokensieve_sessions_evicted_total") == 3
        assert server.metric("tokensieve_sessions_retained") == 1
        assert 0 < server.metric('tokensieve_kv_bytes{location="device"}') <= one * 1.5

        def continued(i: int) -> bool:
            follow = prompts[i] + live.reference.generate(prompts[i], max_new_tokens=4).token_ids + [33]
            reply = client.completions.create(model=MODEL, prompt=follow, max_tokens=2)
            return reply.model_extra["tokensieve"]["prefix_reused"]

        assert continued(3) is True  # the most recent conversation is still there; the oldest is not
        assert continued(0) is False


def test_past_the_device_cap_sessions_park_in_host_memory_and_are_still_reused(live):
    prompts = [live.reference.encode(f"conversation {i} " * 4) for i in range(4)]
    probe = live.reference.start(prompts[0])
    probe.generate(max_new_tokens=4)
    one = probe.stats.kv_bytes_device + probe.stats.kv_bytes_host
    probe.close()
    # room for one conversation on the device and two parked in host memory (a CPU: the same memory, so
    # the default host cap is 0; this sets it to show the tiers)
    with live_server(session_bytes=int(one * 1.5), session_host_bytes=int(one * 2.5)) as server:
        client = server.client()
        for ids in prompts:
            client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
        assert server.metric("tokensieve_sessions_parked_total") == 3
        assert server.metric("tokensieve_sessions_evicted_total") == 1  # the oldest, past the host cap
        assert server.metric("tokensieve_sessions_retained") == 3
        assert 0 < server.metric('tokensieve_kv_bytes{location="host"}') <= one * 2.5

        def continued(i: int) -> tuple[bool, list[int]]:
            follow = prompts[i] + live.reference.generate(prompts[i], max_new_tokens=4).token_ids + [33]
            reply = client.completions.create(model=MODEL, prompt=follow, max_tokens=3, temperature=0)
            expected = live.reference.generate(follow, max_new_tokens=3).text
            return reply.model_extra["tokensieve"]["prefix_reused"], reply.choices[0].text == expected

        assert continued(1) == (True, True)  # parked, brought back, continued: the same text as recomputed
        assert continued(0) == (False, True)  # dropped past the host cap


def test_a_parked_session_continues_exactly_as_if_it_had_stayed(live):
    engine = live.reference
    session = engine.start(engine.encode("a parked conversation " * 6), method="omnikv(budget=16)")
    first = session.generate(max_new_tokens=5)
    device = session.stats.kv_bytes_device
    session.park()
    assert session.stats.kv_bytes_device < device or engine.model.device.type == "cpu"
    session.extend(engine.encode(" and on", special_tokens=False))
    again = session.generate(max_new_tokens=5)
    ids = engine.encode("a parked conversation " * 6) + first.token_ids + engine.encode(" and on", special_tokens=False)
    assert again.token_ids == engine.start(ids, method="omnikv(budget=16)").generate(max_new_tokens=5).token_ids


def test_session_bytes_zero_turns_reuse_off():
    with live_server(session_bytes=0) as server:
        turns = _chat(server.client(), "dense")
        assert [extra["prefix_reused"] for _, extra, _ in turns] == [False, False, False]
        assert server.metric("tokensieve_sessions_retained") == 0


def test_a_dropper_reuses_what_it_kept_and_the_stats_say_what_was_lost(live):
    turns = _chat(live.client(), "streaming_llm(sink=4, window=16)")
    assert [extra["prefix_reused"] for _, extra, _ in turns] == [False, True, True]
    first, later = turns[0][1]["stats"], turns[2][1]["stats"]
    assert not any(first["unseen_tokens_per_layer"])
    assert min(later["unseen_tokens_per_layer"]) > 0  # the evicted earlier tokens, per layer


def test_a_failure_to_retain_a_session_still_answers_and_the_server_keeps_serving(monkeypatch):
    from tokensieve.serve.sessions import SessionPool

    def broken(self, *args, **kwargs):
        raise RuntimeError("retaining failed")

    monkeypatch.setattr(SessionPool, "keep", broken)
    with live_server() as server:
        client = server.client()
        for _ in range(2):  # the second request shows the worker thread survived the first's failure
            reply = client.completions.create(model=MODEL, prompt="still answered", max_tokens=3, temperature=0)
            assert reply.choices[0].finish_reason in ("length", "stop")
        assert server.metric("tokensieve_sessions_retained") == 0


def test_keeping_a_session_measures_only_that_session(monkeypatch):
    """The pool's caps are checked from each session's bytes measured once, when it was kept: measuring
    every retained session again at every request made a response's last chunk wait O(sessions x layers)."""
    import tokensieve
    from tokensieve.engine import Session
    from tokensieve.methods import resolve_method
    from tokensieve.serve.metrics import Metrics
    from tokensieve.serve.prompts import Prompt
    from tokensieve.serve.sessions import SessionPool

    engine = tokensieve.load("tiny")
    method = resolve_method("omnikv(budget=8)")
    pool = SessionPool(engine, 10**12, Metrics(), 0)
    measured = []
    stats = Session.stats
    monkeypatch.setattr(Session, "stats", property(lambda self: measured.append(self) or stats.fget(self)))
    for i in range(5):
        ids = [1 + (i * 7 + j) % 200 for j in range(40)]
        session = engine.start(ids, method=method)
        generation = session.generate(max_new_tokens=2)
        measured.clear()
        pool.keep(session, method, Prompt(None, ids, False), generation)  # token ids: kept whatever the text
        assert set(map(id, measured)) == {id(session)}  # the new session alone, whatever the pool holds
    device, host = pool._bytes()
    held = [r.session.stats for r in pool._kept.values()]
    assert device == sum(s.kv_bytes_device for s in held) > 0 and host == sum(s.kv_bytes_host for s in held)
