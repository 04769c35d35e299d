"""Concurrency on loopback: a burst of streams against a small queue, a client that leaves, a timeout, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import pytest

from .conftest import MODEL, live_server

BURST = 64


async def _stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[int, str, set[str]]:
    """(status, streamed text, chunk ids) of one streaming completion."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, response.json()["error"]["message"], set()
        text, ids, done = "", set(), False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                ids.add(chunk["id"])
                text += chunk["choices"][0]["text"]
        assert done, "a stream ended without [DONE]"
        return 200, text, ids


async def _burst(url: str, prompts: list[str], max_tokens: int):
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(_stream(client, url, p, max_tokens) for p in prompts))


def test_a_burst_of_streams_completes_or_gets_429_and_nothing_is_mixed(live):
    prompts = [f"request {i}: " + "abc " * (i % 7) for i in range(BURST)]
    started = time.monotonic()
    results = asyncio.run(asyncio.wait_for(_burst(live.url, prompts, 24), timeout=120))
    assert time.monotonic() - started < 120
    served = [(p, text, ids) for p, (status, text, ids) in zip(prompts, results, strict=True) if status == 200]
    refused = [text for status, text, _ in results if status == 429]
    assert len(served) + len(refused) == BURST, [s for s, _, _ in results if s not in (200, 429)]
    assert len(served) >= 5  # the running request and the 4 queue places, at least
    assert refused and all("--max-waiting" in message for message in refused)
    for prompt, text, ids in served:  # each got its own text, in one stream of one id
        assert text == live.reference.generate(prompt, max_new_tokens=24).text
        assert len(ids) == 1
    assert len({ids.pop() for _, _, ids in served}) == len(served)
    # the server serves normally afterwards, with nothing left running or waiting
    assert httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}).is_success
    assert live.metric("tokensieve_requests_running") == 0
    assert live.metric("tokensieve_requests_waiting") == 0


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_disconnects_mid_stream_frees_its_place(live):
    cancelled = live.metric("tokensieve_requests_cancelled_total")
    body = {"model": MODEL, "prompt": "go on and on", "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{live.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert live.metric("tokensieve_requests_running") == 1
    # the connection is closed: the generation stops long before its 500 tokens
    assert _wait_for(lambda: live.metric("tokensieve_requests_running") == 0, 10)
    assert live.metric("tokensieve_requests_cancelled_total") == cancelled + 1
    assert httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}).is_success


def test_a_queued_client_that_disconnects_leaves_the_queue_and_never_runs():
    with live_server(max_tokens=1000) as server:
        long = {"model": MODEL, "prompt": "go on", "max_tokens": 1000, "temperature": 0, "stream": True}
        queued = {**long, "max_tokens": 5, "stream": False}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{server.url}/v1/completions", json=long) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            with contextlib.suppress(httpx.TimeoutException):  # it waits behind the long one: give up
                httpx.post(f"{server.url}/v1/completions", json=queued, timeout=0.3)
            assert _wait_for(lambda: server.metric("tokensieve_requests_waiting") == 0, 5)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert _wait_for(lambda: server.metric("tokensieve_requests_running") == 0, 10)
        assert server.metric("tokensieve_generation_tokens_total") == 1000  # the long one's only
        assert server.metric('tokensieve_requests_total{endpoint="/v1/completions",status="499"}') == 1


def test_a_request_past_its_timeout_is_stopped_with_504():
    with live_server(request_timeout_s=0.3, max_tokens=1000) as server:
        body = {"model": MODEL, "prompt": "go on", "max_tokens": 1000, "temperature": 0}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 504
        assert "--request-timeout" in response.json()["error"]["message"]
        assert server.metric("tokensieve_requests_running") == 0


def test_a_stream_past_its_timeout_ends_with_an_error_event_then_done():
    # 0.5 s: well after the first token (milliseconds), well before 1000 tokens of the tiny model (seconds)
    with live_server(request_timeout_s=0.5, max_tokens=1000) as server:
        body = {"model": MODEL, "prompt": "go on", "max_tokens": 1000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
        assert response.status_code == 200  # the stream had begun
        assert lines[-1] == "data: [DONE]"
        assert "--request-timeout" in json.loads(lines[-2][6:])["error"]["message"]


@pytest.mark.parametrize("path", ["/health", "/v1/completions"])
def test_shutting_down_refuses_new_requests_with_503(path):
    with live_server() as server:
        server.app.state.worker.close()  # what SIGTERM does first
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        response = httpx.post(f"{server.url}{path}", json=body) if path != "/health" else httpx.get(server.url + path)
        assert response.status_code == 503
        assert "shutting down" in response.json()["error"]["message"]


def test_shutdown_lets_a_running_stream_finish():
    with live_server() as server:
        body = {"model": MODEL, "prompt": "go", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            stopper = threading.Thread(target=server.server.handle_exit, args=(15, None))
            stopper.start()
            rest = [line for line in lines if line]
            stopper.join()
        chunks = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        assert rest[-1] == "data: [DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["tokensieve"]["stats"]["new_tokens"] == 200
