"""`tokensieve serve` as a user runs it: a subprocess, a request, then SIGTERM and a clean exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tokensieve.commands.serve import byte_size

from .conftest import CHAT_TEMPLATE, MODEL, free_port

SRC = Path(__file__).resolve().parents[2] / "src"


def test_serve_command_answers_then_shuts_down_on_sigterm(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = free_port()
    command = [sys.executable, "-m", "tokensieve.cli", "serve", "--model", MODEL, "--port", str(port)]
    command += ["--threads", "1", "--chat-template", str(template), "--method", "omnikv(budget=0.5)"]
    command += ["--max-waiting", "2", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body).json()
        assert reply["usage"]["completion_tokens"] == 3
        assert reply["tokensieve"]["stats"]["method"]["name"] == "omnikv"  # the command line's default method
        process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is SIGTERM's
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_refuses_a_bad_default_method(capsys):
    from tokensieve.cli import main

    assert main(["serve", "--model", MODEL, "--method", "magic", "--port", str(free_port())]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("1024", 1024), ("512M", 512 << 20), ("2g", 2 << 30), ("0", 0)])
def test_byte_size(text, expected):
    assert byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-3", "12T"])
def test_byte_size_refuses_what_is_not_a_size(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="byte count"):
        byte_size(text)
