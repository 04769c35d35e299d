"""`tokensieve generate`: text after a prompt (text, a file or token ids) under a method, streamed as it decodes."""

from __future__ import annotations

import argparse
import codecs
import json
from pathlib import Path

from .. import inputs
from ..methods import METHODS, resolve_method
from . import options


def register(sub) -> None:
    parser = sub.add_parser(
        "generate",
        help="generate text after a prompt with a method",
        description="Generate text after a prompt, streamed as it decodes. Every option is checked before the "
        "model loads.",
    )
    options.add_model_arguments(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument(
        "--prompt-file",
        action="append",
        help="a file holding the prompt text (read with --encoding); repeat it for a batch",
    )
    prompt.add_argument(
        "--prompts",
        help="a JSONL file of prompts, run as a batch: one per line, a JSON string, a list of token ids, or an "
        'object with "prompt" (text) or "prompt_ids"',
    )
    prompt.add_argument(
        "--prompt-ids",
        help="the prompt as token ids: a JSON list such as '[1, 450, 4996]', or a file holding one",
    )
    parser.add_argument("--encoding", default=None, help="the text encoding of --prompt-file (default: utf-8)")
    parser.add_argument("--max-new-tokens", type=options.positive_int, default=64, help="tokens to generate at most")
    parser.add_argument(
        "--method",
        default="dense",
        help=f"a method name ({', '.join(sorted(METHODS))}) or a spec "
        "with settings, e.g. 'omnikv(budget=256, offload=False)'",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens of this mass")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the sampler, for reproducible sampling (default: random)"
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=None,
        help="a stop string: the text ends before it (repeat the option for several; default: none)",
    )
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (text prompts only)")
    parser.add_argument("--stats", action="store_true", help="print the generation's stats after the text")
    parser.add_argument(
        "--max-batch", type=options.positive_int, default=8, help="a batch's sequences per decode step at most"
    )
    parser.add_argument(
        "--max-kv-bytes",
        type=options.positive_int,
        default=None,
        help="device KV bytes of a batch's running sequences at most: a sequence waits for room (default: no limit)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    prompt, settings = check(args)
    engine = options.load_engine(args, method=args.method)
    if _is_batch(prompt):
        generations = engine.generate(prompt, max_batch=args.max_batch, max_kv_bytes=args.max_kv_bytes, **settings)
        for i, gen in enumerate(generations):
            print(f"--- prompt {i} ({gen.finish_reason}) ---\n{gen.text}")
            if args.stats:
                print(options.format_stats(gen.stats))
        return
    stream = engine.stream(prompt, **settings)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    if args.stats:
        print(options.format_stats(stream.generation.stats))


def check(args: argparse.Namespace) -> tuple[str | list[int], dict]:
    """The prompt and the generation settings, every one checked before the model loads."""
    prompt = read_prompt(args)
    settings = dict(
        max_new_tokens=args.max_new_tokens,  # an int >= 1 by its argparse type
        temperature=inputs.temperature(args.temperature, "--temperature"),
        top_p=inputs.top_p(args.top_p, "--top-p"),
        seed=inputs.seed(args.seed, "--seed"),
        stop=inputs.stop_strings(args.stop, "--stop"),
        chat=args.chat,
    )
    for one in prompt if _is_batch(prompt) else [prompt]:
        inputs.check_prompt(one, chat=args.chat)
        if not isinstance(one, str):
            options.check_context(args.model, len(one), "--prompt-ids", args.max_new_tokens)
    resolve_method(args.method)
    return prompt, settings


def read_prompt(args: argparse.Namespace) -> str | list[int] | list[str | list[int]]:
    """The prompt of `--prompt`, `--prompt-file` or `--prompt-ids`; the batch of several `--prompt-file`s or
    of `--prompts`."""
    if args.encoding is not None and args.prompt_file is None:
        raise ValueError("--encoding is the encoding of --prompt-file: give a --prompt-file, or drop --encoding")
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        texts = [read_text(path, args.encoding or "utf-8", "--prompt-file") for path in args.prompt_file]
        return texts[0] if len(texts) == 1 else texts
    if args.prompts is not None:
        return read_jsonl_prompts(args.prompts)
    text = args.prompt_ids
    if not text.lstrip().startswith("["):
        text = read_text(text, "utf-8", "--prompt-ids")
    try:
        ids = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--prompt-ids is not a JSON list of token ids ({err}): e.g. '[1, 2, 3]'") from None
    return inputs.token_ids(ids, what="--prompt-ids")


def read_jsonl_prompts(path: str) -> list[str | list[int]]:
    """The prompts of a JSONL file, with errors that name the file and the line."""
    prompts = []
    for number, line in enumerate(read_text(path, "utf-8", "--prompts").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--prompts {path} line {number} is not JSON ({err})") from None
        if isinstance(item, dict):
            item = item.get("prompt", item.get("prompt_ids"))
        if isinstance(item, list):
            item = inputs.token_ids(item, what=f"--prompts {path} line {number}")
        if not isinstance(item, (str, list)):
            raise ValueError(
                f"--prompts {path} line {number}: give a JSON string, a list of token ids, or an object with "
                '"prompt" or "prompt_ids"'
            )
        prompts.append(item)
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt")
    return prompts


def _is_batch(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)


def read_text(path: str, encoding: str, option: str) -> str:
    """The text of a file, with errors that name the file and the option."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"--encoding {encoding!r} is not a known text encoding (e.g. utf-8, latin-1)") from None
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{option} {path} is a directory: give a file")
    try:
        return file.read_text(encoding=encoding)
    except FileNotFoundError:
        raise ValueError(f"{option} {path}: no such file") from None
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{option} {path} is not {encoding} text (byte {err.start} is {err.object[err.start]:#04x}): "
            "give its encoding with --encoding, e.g. --encoding latin-1"
        ) from None
    except OSError as err:
        raise ValueError(f"{option} {path} cannot be read: {err.strerror}") from None
