"""Every bad input gets its status and an OpenAI error object naming the problem; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from .conftest import MODEL, POSITIONS

GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GOOD_COMPLETION = {"model": MODEL, "prompt": "hello", "max_tokens": 2}

CASES = {
    "malformed JSON": ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    "missing messages": ("/v1/chat/completions", {"model": MODEL}, 400, "messages: Field required"),
    "messages of the wrong type": ("/v1/chat/completions", {**GOOD_CHAT, "messages": "hi"}, 400, "messages"),
    "max_tokens of the wrong type": ("/v1/completions", {**GOOD_COMPLETION, "max_tokens": "ten"}, 400, "max_tokens"),
    "prompt of the wrong type": ("/v1/completions", {**GOOD_COMPLETION, "prompt": 5}, 400, "prompt"),
    "unknown role": (
        "/v1/chat/completions",
        {**GOOD_CHAT, "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages.0.role",
    ),
    "unknown field": ("/v1/completions", {**GOOD_COMPLETION, "best_of": 3}, 400, "best_of"),
    "unknown model": ("/v1/completions", {**GOOD_COMPLETION, "model": "gpt-4"}, 404, "'gpt-4' is not served"),
    "unknown method": (
        "/v1/completions",
        {**GOOD_COMPLETION, "tokensieve": {"method": "magic"}},
        422,
        "unknown method 'magic'",
    ),
    "bad method spec": (
        "/v1/chat/completions",
        {**GOOD_CHAT, "tokensieve": {"method": "omnikv(budget=)"}},
        422,
        "bad method spec",
    ),
    "budget <= 0": (
        "/v1/completions",
        {**GOOD_COMPLETION, "tokensieve": {"method": "omnikv(budget=0)"}},
        422,
        "budget must be > 0",
    ),
    "negative budget (chat)": (
        "/v1/chat/completions",
        {**GOOD_CHAT, "tokensieve": {"method": "snapkv(budget=-4)"}},
        422,
        "budget must be > 0",
    ),
    "prompt beyond the model's positions": (
        "/v1/completions",
        {**GOOD_COMPLETION, "prompt": "x" * POSITIONS},
        413,
        f"beyond this server's limit of {POSITIONS - 1}",
    ),
    "prompt plus max_tokens beyond the positions": (
        "/v1/completions",
        {**GOOD_COMPLETION, "prompt": "x" * (POSITIONS - 10), "max_tokens": 20},
        413,
        "lower max_tokens",
    ),
    "max_tokens <= 0": ("/v1/completions", {**GOOD_COMPLETION, "max_tokens": 0}, 422, "max_tokens"),
    "max_tokens above the server's limit": (
        "/v1/completions",
        {**GOOD_COMPLETION, "max_tokens": 100_000},
        422,
        "above this server's limit of 512",
    ),
    "negative temperature": ("/v1/chat/completions", {**GOOD_CHAT, "temperature": -1}, 422, "temperature"),
    "n > 1": ("/v1/chat/completions", {**GOOD_CHAT, "n": 2}, 422, "one choice per request"),
    "logprobs": ("/v1/chat/completions", {**GOOD_CHAT, "logprobs": True}, 422, "logprobs is not implemented"),
    "a penalty": ("/v1/completions", {**GOOD_COMPLETION, "presence_penalty": 0.5}, 422, "presence_penalty is not"),
    "echo": ("/v1/completions", {**GOOD_COMPLETION, "echo": True}, 422, "echo is not implemented"),
    "neutral values of unimplemented fields are fine": (
        "/v1/completions",
        {**GOOD_COMPLETION, "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": None, "echo": False},
        200,
        "",
    ),
    "empty prompt": ("/v1/completions", {**GOOD_COMPLETION, "prompt": ""}, 400, "prompt"),
    "token id outside the vocabulary": ("/v1/completions", {**GOOD_COMPLETION, "prompt": [1, 99999]}, 422, "[0, 258)"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_gets_its_status_and_message(live, case):
    path, body, status, message = CASES[case]
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{live.url}{path}", headers={"content-type": "application/json"}, **sent)
    assert response.status_code == status, response.text
    if status == 200:
        return
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"] and error["code"] == status
    # the server keeps serving
    assert httpx.post(f"{live.url}/v1/chat/completions", json=GOOD_CHAT).status_code == 200


def test_openai_client_raises_the_matching_errors(live):
    import openai

    client = live.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    with pytest.raises(openai.UnprocessableEntityError, match="budget must be > 0"):
        client.completions.create(
            model=MODEL, prompt="hi", max_tokens=1, extra_body={"tokensieve": {"method": "omnikv(budget=0)"}}
        )


def test_a_chat_without_a_template_is_refused_clearly(live):
    tokenizer = live.app.state.worker.engine.tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        response = httpx.post(f"{live.url}/v1/chat/completions", json=GOOD_CHAT)
    finally:
        tokenizer.chat_template = template
    assert response.status_code == 400
    assert "--chat-template" in response.json()["error"]["message"]


def test_unknown_path_is_an_error_object(live):
    response = httpx.get(f"{live.url}/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == 404
