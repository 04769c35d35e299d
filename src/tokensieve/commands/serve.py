"""`tokensieve serve`: the OpenAI-compatible server on the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..methods import METHODS
from ..serve.config import ServeConfig
from .options import add_model_arguments, load_engine, model_options, positive_int  # what every command shares

DEFAULTS = ServeConfig()
SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def byte_size(text: str) -> int:
    """`1073741824`, `512M` or `2G` (powers of 1024) as bytes."""
    number, suffix = text.strip()[:-1], text.strip()[-1:].upper()
    if suffix.isdigit():
        number, suffix = text.strip(), ""
    if suffix not in SIZE_SUFFIXES or not number.isdigit():
        raise argparse.ArgumentTypeError(f"must be a byte count such as 1073741824, 512M or 2G, got {text!r}")
    return int(number) * SIZE_SUFFIXES[suffix]


def register(sub) -> None:
    parser = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs tokensieve[serve])")
    add_model_arguments(parser)
    parser.add_argument(
        "--method",
        default=DEFAULTS.method,
        help=f"the method of requests that name none: {', '.join(sorted(METHODS))} or a spec such as "
        "'omnikv(budget=0.1)'",
    )
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on")
    parser.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    parser.add_argument("--chat-template", type=Path, default=None, help="a Jinja chat template file to use")
    parser.add_argument(
        "--replicas",
        type=positive_int,
        default=1,
        help="server processes behind the one port (uvicorn workers), each with its own copy of the model",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-running",
        type=positive_int,
        default=DEFAULTS.max_running,
        help="requests decoded together in one batched step (continuous batching)",
    )
    limits.add_argument(
        "--max-waiting", type=positive_int, default=DEFAULTS.max_waiting, help="queued requests before 429"
    )
    limits.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        default=None,
        help="longest prompt accepted (default: the model's positions)",
    )
    limits.add_argument(
        "--max-tokens",
        type=positive_int,
        default=DEFAULTS.max_tokens,
        help="most tokens a request may generate, and its max_tokens when it names none",
    )
    limits.add_argument(
        "--request-timeout", type=float, default=DEFAULTS.request_timeout_s, help="seconds, queueing included (504)"
    )
    limits.add_argument(
        "--session-bytes",
        type=byte_size,
        default=DEFAULTS.session_bytes,
        help="KV memory retained sessions may hold for multi-turn reuse, e.g. 512M (0: no reuse; default 1G)",
    )
    limits.add_argument(
        "--session-host-bytes",
        type=byte_size,
        default=None,
        help="host memory for the KV of retained sessions parked past --session-bytes, e.g. 4G (0: drop them; "
        "default 4G on CUDA, 0 on a CPU)",
    )
    limits.add_argument(
        "--shutdown-grace",
        type=float,
        default=DEFAULTS.shutdown_grace_s,
        help="seconds queued and running requests may still finish on shutdown",
    )
    levels = ["critical", "error", "warning", "info", "debug"]
    parser.add_argument("--log-level", default="info", choices=levels, help="uvicorn's log level")
    parser.set_defaults(run=run)


def config_from(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        model_name=args.served_model_name or args.model,
        method=args.method,
        max_running=args.max_running,
        max_waiting=args.max_waiting,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout,
        session_bytes=args.session_bytes,
        session_host_bytes=args.session_host_bytes,
        shutdown_grace_s=args.shutdown_grace,
    )


def run(args: argparse.Namespace) -> None:
    try:
        from ..serve.app import create_app
        from ..serve.server import GracefulServer
    except ImportError as err:
        raise ValueError(f"tokensieve serve needs its extra: pip install 'tokensieve[serve]' ({err})") from err

    config = config_from(args)
    chat_template = None if args.chat_template is None else args.chat_template.read_text()
    if args.replicas > 1:
        from ..serve import replicas

        options = model_options(args, method=args.method)
        replicas.serve(
            options,
            config,
            replicas=args.replicas,
            host=args.host,
            port=args.port,
            chat_template=chat_template,
            log_level=args.log_level,
        )
        return
    engine = load_engine(args, method=args.method)
    if chat_template is not None:
        engine.tokenizer.chat_template = chat_template
    GracefulServer.of(create_app(engine, config), args.host, args.port, log_level=args.log_level).run()
