"""Several replicas of the server behind one port: uvicorn's own multi-process mode (`workers=N`).

uvicorn's supervisor binds the port once and starts N worker processes on that one listening socket, so the
kernel spreads the connections over them; it restarts a worker that dies, and on SIGINT/SIGTERM it sends
SIGTERM to every worker and waits for them. Each worker is a whole server: it loads its own engine with
`replica_app()`, the app factory named by `FACTORY`, from the options the command put in
`$TOKENSIEVE_SERVE_REPLICA` (JSON), so that the arguments are parsed once, by the command. The metrics of
every replica go to files in one directory (prometheus-client's multiprocess mode), so that one scrape of any
replica reports the endpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from .config import ServeConfig
from .metrics import MULTIPROC_DIR

SPEC = "TOKENSIEVE_SERVE_REPLICA"  # the environment variable carrying a replica's options (JSON)
FACTORY = "tokensieve.serve.replicas:replica_app"  # uvicorn starts workers from an import string, not an object
FAILED = "failed"  # a replica that could not start writes why into this file of the run's directory

log = logging.getLogger("tokensieve.serve")


def serve(
    engine_options: dict,
    config: ServeConfig,
    *,
    replicas: int,
    host: str,
    port: int,
    chat_template: str | None = None,
    log_level: str = "info",
) -> None:
    """Run `replicas` server processes on `host:port` until SIGINT/SIGTERM. `engine_options` are
    `loading.load_engine`'s keywords; a replica that fails to load makes this raise `ValueError` with why."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if engine_options.get("tensor_parallel_size", 1) > 1:
        raise ValueError(
            "--replicas with --tensor-parallel-size is not supported (a replica cannot start worker ranks of its "
            "own): run one tensor-parallel server per group of devices, on its own port, behind a load balancer"
        )
    if port == 0:
        raise ValueError("--replicas needs a fixed --port: the replicas share one socket, bound before they start")
    run_dir = Path(tempfile.mkdtemp(prefix="tokensieve-serve-"))
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    spec = dict(engine=engine_options, config=asdict(config), chat_template=chat_template, run_dir=str(run_dir))
    saved = {name: os.environ.get(name) for name in (SPEC, MULTIPROC_DIR)}
    # Spawned workers inherit the environment: prometheus-client reads the directory when a replica imports it.
    os.environ[SPEC] = json.dumps(spec)
    os.environ[MULTIPROC_DIR] = str(metrics_dir)
    try:
        # What `uvicorn.run(..., workers=N)` does, but for the socket's TCP_NODELAY (`listening_socket`).
        settings = uvicorn.Config(
            FACTORY,
            factory=True,
            workers=replicas,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=config.shutdown_grace_s,
        )
        with listening_socket(settings) as sock, contextlib.suppress(KeyboardInterrupt):
            Multiprocess(settings, sockets=[sock]).run()
        failed = run_dir / FAILED
        if failed.exists():  # uvicorn's supervisor stops when a worker fails before serving
            raise ValueError(f"a replica failed to start: {failed.read_text()}")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(run_dir, ignore_errors=True)


def listening_socket(settings) -> socket.socket:
    """The port's socket, bound by uvicorn, with TCP_NODELAY, which the connections accepted on it inherit
    (Linux). uvicorn binds it with protocol number 0, and asyncio turns Nagle's algorithm off only on the
    connections of a socket that says IPPROTO_TCP (uvicorn issue 3149), so a stream's small chunks would each
    wait for the client's delayed ACK, about 40 ms. One server binds through asyncio and is not affected."""
    sock = settings.bind_socket()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def replica_app():
    """uvicorn's app factory in each replica: load the engine the command described, return its app."""
    from transformers.utils import logging as hf_logging
    from uvicorn.config import STARTUP_FAILURE

    from ..loading import load_engine
    from .app import create_app
    from .metrics import Metrics

    # N replicas loading at once would interleave N progress bars (and each bar's multiprocessing lock
    # would be reported as leaked when the replica ends by its signal, as uvicorn's workers do).
    hf_logging.disable_progress_bar()
    spec = json.loads(os.environ[SPEC])
    try:
        engine = load_engine(**spec["engine"])
        config = ServeConfig(**spec["config"])
    except (ValueError, TypeError, OSError) as err:
        # A clean exit with uvicorn's startup-failure status stops the supervisor instead of a restart loop;
        # the file tells the command why, so that it exits with the error as a single server would.
        with contextlib.suppress(OSError):
            (Path(spec["run_dir"]) / FAILED).write_text(f"{type(err).__name__}: {err}")
        log.error("tokensieve: error: %s", err)
        sys.exit(STARTUP_FAILURE)
    if spec["chat_template"] is not None:
        engine.tokenizer.chat_template = spec["chat_template"]
    served = create_app(engine, config, metrics=Metrics(multiprocess=True))
    _refuse_new_requests_on_exit(served.state.worker)
    return served


def _refuse_new_requests_on_exit(worker) -> None:
    """On SIGINT/SIGTERM, the replica's worker refuses new requests (503) before uvicorn's own shutdown
    starts, as `GracefulServer` does for a single server. A replica runs uvicorn's plain `Server`, which has
    installed its signal handlers by the time it loads the app (it restores the previous ones when it
    stops): chain onto them."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if not callable(previous):  # not uvicorn's handler: leave the default behaviour alone
            continue

        def handler(number, frame, previous=previous):
            worker.close()
            previous(number, frame)

        signal.signal(sig, handler)
