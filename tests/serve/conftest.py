"""A live `tokensieve serve` on 127.0.0.1 (a uvicorn thread on a free port) over the tiny preset."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass

import httpx
import pytest

import tokensieve
from tokensieve import presets
from tokensieve.serve.app import create_app
from tokensieve.serve.config import ServeConfig
from tokensieve.serve.server import GracefulServer, running

MODEL = "tiny"
POSITIONS = 1024  # small, so that "a prompt beyond the model's positions" is cheap to build
# A plain chat template for the byte tokenizer (which has none): the role tag, the content, EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class Live:
    """A running server: its base URL, its app (worker, metrics) and an engine over the same model
    (a second `Engine`, so the reference generations of a test never share state with the server's)."""

    url: str
    app: object
    server: GracefulServer
    reference: tokensieve.Engine

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60, **kwargs)

    def metric(self, name: str) -> float:
        """A sample's value from /metrics (0 when it has none yet)."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(**settings):
    """Serve a fresh tiny engine with `ServeConfig(**settings)` until the block ends."""
    model, tokenizer = presets.build(MODEL, max_positions=POSITIONS)
    tokenizer.chat_template = CHAT_TEMPLATE
    engine = tokensieve.load(model, tokenizer=tokenizer)
    app = create_app(engine, ServeConfig(**{"model_name": MODEL, **settings}))
    with running(app) as (server, url):
        yield Live(url, app, server, tokensieve.Engine(engine.model, tokenizer))


@pytest.fixture(scope="module")
def live():
    with live_server(max_waiting=4) as served:
        yield served
