"""`tokensieve serve --replicas 2`: two server processes behind one port, launched as docs/distributed.md does."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

import tokensieve
from tokensieve.serve import replicas
from tokensieve.serve.app import PID_HEADER

from .conftest import CHAT_TEMPLATE, free_port

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "distributed.md").read_text()
SECTION = DOC.split("## Replicas for throughput", 1)[1]
BASH = re.findall(r"```bash\n(.*?)```", SECTION, re.S)
LAUNCH = next(line for block in BASH for line in block.splitlines() if line.startswith("tokensieve serve"))
CALLS = next(block for block in BASH if block.lstrip().startswith(("for ", "curl")))
DOC_PORT = "8000"
STARTUP_S = 90  # two replicas import torch and load the model at once, on two busy cores
EXIT_S = 30
PROMPTS = [f"Story {i}: once upon a time" for i in range(8)]
NEW_TOKENS = 8
# A stream of a few seconds: it outlasts the supervisor's relay of SIGTERM to the replicas (it polls its signals
# every 0.5 s), so that the replica serving it is shutting down while it runs.
LONG_PROMPT, LONG_TOKENS = "The quick brown fox", 1000
RELAY_S = 1.0
QUESTION = [{"role": "user", "content": "Tell me a story."}]


def _launch(port: int, template: Path) -> subprocess.Popen:
    """The documented launch line on `port` (with a chat template, and room for the long stream), as
    `python -m tokensieve.cli`, in its own process group (so that a failed test can kill the supervisor and
    its replicas together)."""
    argv = shlex.split(LAUNCH)
    assert argv[:2] == ["tokensieve", "serve"] and argv[argv.index("--port") + 1] == DOC_PORT
    argv[argv.index("--port") + 1] = str(port)
    command = [sys.executable, "-m", "tokensieve.cli", *argv[1:], "--log-level", "warning"]
    command += ["--chat-template", str(template), "--max-tokens", str(LONG_TOKENS)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_healthy(process: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the replicas did not start in time"
        time.sleep(0.2)


def _complete(url: str, prompt: str, **fields) -> httpx.Response:
    body = {"model": "testbed", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, **fields}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)  # a new connection each


def _metric(text: str, sample: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " "))


def _port_is_free(port: int) -> bool:
    """Whether a new server could listen on `port` now (as uvicorn does, with SO_REUSEADDR: the connections the
    shutdown closed may linger in TIME_WAIT, which does not hold the port)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def reference():
    """Greedy texts of one in-process engine over the same model (one thread, as the replicas run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = tokensieve.load("testbed")
        texts = {prompt: engine.generate(prompt, max_new_tokens=NEW_TOKENS) for prompt in PROMPTS}
        texts[LONG_PROMPT] = engine.generate(LONG_PROMPT, max_new_tokens=LONG_TOKENS)
        engine.tokenizer.chat_template = CHAT_TEMPLATE
        texts["chat"] = engine.generate(QUESTION[0]["content"], max_new_tokens=NEW_TOKENS, chat=True)
        return {prompt: generation.text for prompt, generation in texts.items()}
    finally:
        torch.set_num_threads(threads)


def test_two_replicas_serve_one_port_count_together_and_stop_on_sigterm(reference, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _launch(port, template)
    try:
        _wait_healthy(process, url)

        # Concurrent completions, each on its own connection, until both replicas have answered.
        pids: set[int] = set()
        sent = 0
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            for _ in range(10):
                for prompt, reply in zip(PROMPTS, pool.map(lambda p: _complete(url, p), PROMPTS), strict=True):
                    assert reply.status_code == 200, reply.text
                    assert reply.json()["choices"][0]["text"] == reference[prompt]
                    pids.add(int(reply.headers[PID_HEADER]))
                sent += len(PROMPTS)
                if len(pids) == 2:
                    break
        assert len(pids) == 2, f"only replica {pids} answered {sent} concurrent requests"

        # One scrape reaches one replica and counts both.
        metrics = httpx.get(f"{url}/metrics").text
        assert _metric(metrics, 'tokensieve_requests_total{endpoint="/v1/completions",status="200"}') == sent
        assert _metric(metrics, "tokensieve_generation_tokens_total") == sent * NEW_TOKENS
        assert _metric(metrics, "tokensieve_requests_running") == 0
        assert "pid=" not in metrics  # gauges summed over the replicas, not one series per process

        body = {"model": "testbed", "messages": QUESTION, "max_tokens": NEW_TOKENS, "temperature": 0}
        chat = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)  # the template reached the replicas
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == reference["chat"]

        # The documented calls work against it.
        calls = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", CALLS.replace(f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{port}")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert calls.returncode == 0, calls.stderr
        assert '"pid":' in calls.stdout and PID_HEADER in calls.stdout.lower()
        assert "tokensieve_requests_total{" in calls.stdout

        # SIGTERM while a stream runs: the stream still completes, then every process exits.
        body = {"model": "testbed", "prompt": LONG_PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0}
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            assert stream.status_code == 200
            events = (line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: "))
            first = next(events)  # the first piece: generating now
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            events = [first, *events]
        assert time.monotonic() - signalled > RELAY_S, "the stream ended before its replica was signalled"
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == LONG_TOKENS
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == reference[LONG_PROMPT]
        assert process.wait(timeout=EXIT_S) == 0
        output = process.stdout.read()
        assert "Traceback" not in output and "leaked" not in output, output
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert _port_is_free(port)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_replica_that_cannot_load_stops_the_command_with_its_error(tmp_path):
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "tokensieve.cli", "serve", "--model", str(tmp_path), "--replicas", "2"]
        + ["--threads", "1", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
    )
    assert done.returncode == 2
    assert "a replica failed to start" in done.stderr and "no config.json" in done.stderr
    assert _port_is_free(port)


def test_replicas_refuse_zero_and_port_zero(capsys):
    from tokensieve.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--model", "testbed", "--replicas", "0"])
    assert "--replicas: must be an int >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", "testbed", "--replicas", "2", "--port", "0"]) == 2
    assert "--replicas needs a fixed --port" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--replicas", "2", "--port", "8123", "--tensor-parallel-size", "2"]) == 2
    assert "--replicas with --tensor-parallel-size is not supported" in capsys.readouterr().err


def test_a_replica_closes_its_queue_on_the_signal_that_stops_its_server():
    """A replica runs uvicorn's plain `Server`, whose signal handlers are in place when it calls the app
    factory: the factory's handler closes the queue (503 for new requests), then hands over to uvicorn's."""
    import uvicorn

    closed = []
    seen = {}

    def factory():
        seen["before"] = signal.getsignal(signal.SIGTERM)
        replicas._refuse_new_requests_on_exit(SimpleNamespace(close=lambda: closed.append(True)))
        seen["after"] = signal.getsignal(signal.SIGTERM)

        async def app(scope, receive, send):  # lifespan events only: nothing connects
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

        return app

    server = uvicorn.Server(uvicorn.Config(factory, factory=True, port=free_port(), log_level="warning"))

    def signal_once_started():
        deadline = time.monotonic() + EXIT_S
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["after"](signal.SIGTERM, None)  # what the signal would run, without signalling pytest itself

    original = signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises the signal once stopped
    try:
        threading.Thread(target=signal_once_started, daemon=True).start()
        server.run()
    finally:
        signal.signal(signal.SIGTERM, original)
    assert seen["before"] == server.handle_exit  # uvicorn's handler was there to chain onto
    assert closed == [True] and server.should_exit


@pytest.mark.skipif(sys.platform != "linux", reason="accepted sockets inherit TCP_NODELAY from the listener on Linux")
def test_the_shared_socket_gives_its_connections_tcp_nodelay():
    """Without it a stream's chunks wait for delayed ACKs (about 40 ms each) in every replica."""
    import uvicorn

    listener = replicas.listening_socket(uvicorn.Config(replicas.FACTORY, port=free_port()))
    listener.listen()  # each replica's server does, on this socket
    with listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
