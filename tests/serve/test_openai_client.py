"""The official `openai` client against a live server: the text equals in-process `engine.generate` (greedy)."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from .conftest import MODEL

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


def test_models_lists_the_served_model(live):
    assert [m.id for m in live.client().models.list().data] == [MODEL]


def test_health_names_the_process_that_answered(live):
    reply = httpx.get(f"{live.url}/health")
    assert reply.json() == {"status": "ok", "model": MODEL, "pid": os.getpid()}  # served from a thread here
    assert reply.headers["x-tokensieve-pid"] == str(os.getpid())


@pytest.mark.parametrize(
    "method", [None, "omnikv(budget=0.5)", "sliminfer(budgets=(0.5, 0.25, 0.125))", "sliminfer+omnikv(budget=0.5)"]
)
def test_completion_equals_engine_generate(live, method):
    extra = {} if method is None else {"extra_body": {"tokensieve": {"method": method}}}
    reply = live.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, **extra)
    expected = live.reference.generate(PROMPT, max_new_tokens=12, method=method or "dense")
    choice = reply.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == expected.stats.prompt_tokens + 12
    stats = reply.model_extra["tokensieve"]["stats"]
    assert stats["method"] == json.loads(json.dumps(expected.stats.method))  # tuples travel as lists
    assert stats["prefill_tokens_per_layer"] == expected.stats.prefill_tokens_per_layer
    assert stats["kv_bytes_device"] == expected.stats.kv_bytes_device


def test_method_selection_changes_what_is_computed(live):
    """SlimInfer prunes prefill rows after its pruning layers: the stats a client sees say so."""
    client = live.client()
    dense = client.completions.create(model=MODEL, prompt=PROMPT * 4, max_tokens=2, temperature=0)
    pruned = client.completions.create(
        model=MODEL,
        prompt=PROMPT * 4,
        max_tokens=2,
        temperature=0,
        extra_body={"tokensieve": {"method": "sliminfer(budgets=(0.25, 0.125, 0.0625))"}},
    )
    dense_rows = dense.model_extra["tokensieve"]["stats"]["prefill_tokens_per_layer"]
    pruned_rows = pruned.model_extra["tokensieve"]["stats"]["prefill_tokens_per_layer"]
    assert sum(pruned_rows) < sum(dense_rows)


def test_streamed_completion_equals_engine_generate(live):
    stream = live.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    expected = live.reference.generate(PROMPT, max_new_tokens=16)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert len({c.id for c in chunks}) == 1


def test_chat_equals_engine_generate_with_the_chat_template(live):
    question = "What is a fox?"
    reply = live.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=10, temperature=0
    )
    expected = live.reference.generate(question, max_new_tokens=10, chat=True)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens


def test_streamed_chat_with_method_equals_engine_generate(live):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about dogs."}]
    stream = live.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"tokensieve": {"method": "lazyllm"}},
    )
    chunks = list(stream)
    ids = live.reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    expected = live.reference.generate(list(ids), max_new_tokens=10, method="lazyllm")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["tokensieve"]["stats"]["method"]["name"] == "lazyllm"


def test_stop_string_and_token_id_prompt(live):
    ids = live.reference.encode(PROMPT)
    full = live.reference.generate(ids, max_new_tokens=12)
    stop = full.text[3:5]
    reply = live.client().completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0, stop=[stop])
    assert reply.choices[0].text == full.text[: full.text.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_metrics_count_requests_and_tokens(live):
    before = live.metric("tokensieve_generation_tokens_total")
    live.client().completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0)
    assert live.metric("tokensieve_generation_tokens_total") == before + 5
    text = httpx.get(f"{live.url}/metrics").text
    for name in (
        'tokensieve_requests_total{endpoint="/v1/completions",status="200"}',
        "tokensieve_ttft_seconds_bucket",
        "tokensieve_tpot_seconds_bucket",
        "tokensieve_requests_running",
        "tokensieve_requests_waiting",
        'tokensieve_kv_bytes{location="device"}',
        'tokensieve_prefix_reuse_total{outcome="miss"}',
    ):
        assert name in text, name
