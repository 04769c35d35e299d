"""uvicorn, with a shutdown that refuses new requests first and lets the open ones finish."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI


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
