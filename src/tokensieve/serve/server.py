"""uvicorn, with a shutdown that refuses new requests first and lets the open ones finish."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn
from fastapi import FastAPI

STARTUP_S = 30.0


class GracefulServer(uvicorn.Server):
    """On SIGINT/SIGTERM (or `should_exit`), new requests get 503 at once; open responses may finish within
    `--shutdown-grace`; then the worker stops what still runs with a 503 error event."""

    @classmethod
    def of(cls, app: FastAPI, host: str, port: int, log_level: str = "info") -> GracefulServer:
        grace = app.state.worker.config.shutdown_grace_s
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace)
        server = cls(config)
        server.worker = app.state.worker
        return server

    def handle_exit(self, sig, frame) -> None:
        self.worker.close()
        super().handle_exit(sig, frame)


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Serve `app` from a background thread while the block runs; yields (server, base URL). Port 0 takes a
    free port. For tests and measurements: the command line runs `GracefulServer.run` in the main thread."""
    server = GracefulServer.of(app, host, port, log_level=log_level)
    thread = threading.Thread(target=server.run, name="tokensieve-serve-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port} within {STARTUP_S} s")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield server, f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=STARTUP_S)
