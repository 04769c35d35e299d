"""The server's settings: the served model name, the default method and every limit (command-line flags)."""

from __future__ import annotations

from dataclasses import dataclass

from ..methods import resolve_method


@dataclass(frozen=True)
class ServeConfig:
    """Each field is a `tokensieve serve` flag of the same name (`max_waiting` is `--max-waiting`)."""

    model_name: str = "tokensieve"
    method: str = "dense"  # the default for requests that name none
    max_running: int = 8  # requests decoded together, one batched step for all (continuous batching)
    max_waiting: int = 16  # requests queued behind the running ones; more get 429
    max_prompt_tokens: int | None = None  # None: the model's positions
    max_tokens: int = 512  # the most tokens one request may generate (and the default when it names none)
    request_timeout_s: float = 300.0  # from arrival, queueing included; past it the generation stops (504)
    session_bytes: int = 1 << 30  # KV memory retained sessions may hold for prefix reuse; 0 turns reuse off
    session_host_bytes: int | None = None  # parked sessions' KV in host memory; None: 4 GiB on CUDA, 0 on a CPU
    shutdown_grace_s: float = 30.0  # on shutdown, how long running and queued requests may still finish

    def __post_init__(self):
        resolve_method(self.method)  # a bad default is the operator's error: refuse to start
        for name in ("max_running", "max_waiting", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        for name in ("request_timeout_s", "shutdown_grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.session_bytes < 0:
            raise ValueError(f"session_bytes must be >= 0 (0 turns prefix reuse off), got {self.session_bytes}")
        if self.session_host_bytes is not None and self.session_host_bytes < 0:
            raise ValueError(f"session_host_bytes must be >= 0 (0: drop, never park), got {self.session_host_bytes}")

    def host_bytes_for(self, device) -> int:
        """`session_host_bytes`, its default resolved for the engine's device (a CPU's host memory is its
        device memory: parking there frees nothing)."""
        if self.session_host_bytes is not None:
            return self.session_host_bytes
        return 4 << 30 if device.type == "cuda" else 0
