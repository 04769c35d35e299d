"""The FastAPI application: the OpenAI routes, /health and /metrics, over one engine and one worker."""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from .config import ServeConfig
from .errors import ServeError
from .metrics import Metrics
from .prompts import Prompt, chat_prompt, check_length, completion_prompt
from .replies import Replies
from .schemas import ChatRequest, CompletionRequest, ModelCard, ModelList
from .worker import Job, Worker

# Pydantic error types that mean "well-formed, but a value this server refuses" (422); the rest is 400.
SETTING_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "value_error"}
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
CLIENT_GONE = 499  # the status logged for a request whose client left (nobody receives it)
DISCONNECT_POLL_S = 0.25  # how often a request waiting for its next event checks that its client is still there
PID_HEADER = "x-tokensieve-pid"  # on every response: the process that answered (with --replicas, which replica)


def create_app(engine, config: ServeConfig | None = None, metrics: Metrics | None = None) -> FastAPI:
    """An ASGI app serving `engine` (run it with uvicorn); the worker thread lives as long as the app.
    `metrics` defaults to this app's own (`Metrics()`); a replica passes `Metrics(multiprocess=True)`."""
    config = config or ServeConfig()
    metrics = metrics or Metrics()
    worker = Worker(engine, config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="tokensieve", lifespan=lifespan)
    app.state.worker = worker
    app.state.metrics = metrics
    app.add_middleware(_CountResponses, metrics=metrics)
    app.add_middleware(_NameProcess)
    _add_error_handlers(app)
    created = int(time.time())

    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.closing:
            return _error(ServeError(503, "the server is shutting down"))
        return JSONResponse({"status": "ok", "model": config.model_name, "pid": os.getpid()})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=config.model_name, created=created)]).model_dump()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, config)
        return await _answer(body, completion_prompt(engine, body), False, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(body.model, config)
        return await _answer(body, chat_prompt(engine, body), True, request)

    async def _answer(body: CompletionRequest | ChatRequest, prompt: Prompt, chat: bool, request: Request):
        spec = body.tokensieve.method or config.method
        try:
            method = engine.resolve(spec)
        except (ValueError, TypeError) as err:
            raise ServeError(422, f"tokensieve.method: {err}", "tokensieve.method") from err
        job = Job(
            prompt=prompt,
            method=method,
            max_tokens=check_length(engine, prompt, body.requested_tokens, config),
            sampling=dict(temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop),
            reuse=body.tokensieve.reuse,
            deadline=time.monotonic() + config.request_timeout_s,
            loop=asyncio.get_running_loop(),
        )
        worker.submit(job)
        replies = Replies(chat, config.model_name)
        try:
            first = await _next_event(job, request)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        if first[0] == "error":
            return _error(first[1])
        if not body.stream:
            return await _whole(job, first, replies, request)
        events = _stream(job, first, replies, request, body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _whole(job: Job, event: tuple[str, Any], replies: Replies, request: Request):
        try:
            while event[0] == "piece":
                event = await _next_event(job, request)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        if event[0] == "error":
            return _error(event[1])
        return JSONResponse(replies.whole(event[1]))

    async def _stream(job: Job, first, replies: Replies, request: Request, include_usage: bool):
        finished = False
        try:
            async for chunk in replies.stream(first, lambda: _next_event(job, request), include_usage):
                yield chunk
            finished = True
        except ClientGone:
            pass
        finally:
            if not finished:  # the client disconnected mid-stream: stop its generation, free its place
                worker.cancel(job)

    async def _next_event(job: Job, request: Request) -> tuple[str, Any]:
        """The job's next event. When the client disconnects meanwhile (`ClientGone`), or the request's task
        is cancelled, the job is cancelled first: it leaves the queue, or its generation stops."""
        try:
            while True:
                try:
                    return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise ClientGone from None
        except (ClientGone, asyncio.CancelledError):
            worker.cancel(job)
            raise

    return app


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


def _check_model(name: str, config: ServeConfig) -> None:
    if name != config.model_name:
        raise ServeError(404, f"model {name!r} is not served here: this server serves {config.model_name!r}", "model")


def _error(err: ServeError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        status = 422 if all(p["type"] in SETTING_ERRORS for p in problems) else 400
        first = problems[0]
        if first["type"] == "json_invalid":
            return _error(ServeError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"))
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        messages = "; ".join(_describe(p) for p in problems[:5])
        return _error(ServeError(status, messages, param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(ServeError(err.status_code, str(err.detail)))


def _describe(problem: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in problem["loc"][1:]) or "body"
    got = f" (got {problem['input']!r})" if problem["type"] != "missing" and "input" in problem else ""
    return f"{where}: {problem['msg']}{got}"[:300]


class _CountResponses:
    """ASGI middleware counting responses by endpoint and status (streams included, unlike a route hook)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class _NameProcess:
    """ASGI middleware adding the answering process's pid to every response (`x-tokensieve-pid`): with
    several replicas behind one port, it says which one answered."""

    def __init__(self, app):
        self.app = app
        self.header = (PID_HEADER.encode(), str(os.getpid()).encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def naming_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, naming_send)
