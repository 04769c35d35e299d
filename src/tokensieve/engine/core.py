"""The engine: one model, one tokenizer, a default method; it starts sessions and runs one-shot calls on them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import inputs
from ..generation import Generation, Sampling
from ..methods import Method, check_method_defaults, resolve_method
from ..model import DecoderModel
from .executor import Executor
from .loop import DecodeCounts
from .scheduler import BatchStream, Scheduler
from .session import Session
from .stream import GenerationStream


class Engine:
    """Generation with one model, one tokenizer and a default method (overridable per call).

    Sessions of one engine may live at once and be used from several threads: their forward passes are
    serialized by the executor's lock (correct, not parallel), and each session keeps its own state.
    `executor` runs the layer loop (default: here, on `model`; a tensor-parallel leader also drives the
    other ranks). `method_defaults` maps method names to the settings a bare name stands for with this model
    (e.g. `{"lazyllm": "lazyllm(prune_layers=(23,), budgets=(0.3,))"}`, a schedule measured on it by
    `tokensieve calibrate-pruning`); names it leaves out keep their classes' defaults (the papers').
    """

    def __init__(
        self,
        model: DecoderModel,
        tokenizer,
        method: str | Method = "dense",
        prefill_chunk: int | None = None,
        executor: Executor | None = None,
        method_defaults: dict[str, str | Method] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.method_defaults = check_method_defaults(method_defaults)
        self.method = self.resolve(method)
        self.prefill_chunk = _check_chunk(prefill_chunk)
        self.executor = executor or Executor(model)
        self.eos_ids = self._eos_ids()

    def close(self) -> None:
        """Release the engine's workers (the other ranks of a tensor-parallel engine); sessions end with it."""
        self.executor.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------------------------
    def resolve(self, method: str | Method) -> Method:
        """The method a name, a spec or an instance stands for on this engine: a bare name takes this
        model's `method_defaults` where it has one."""
        return resolve_method(method, self.method_defaults)

    def start(
        self,
        prompt: str | Sequence[int],
        *,
        method: str | Method | None = None,
        chat: bool = False,
        prefill_chunk: int | None = None,
        defer_prefill: bool = False,
    ) -> Session:
        """A session over `prompt` (text or token ids), prefilled now; continue it with `generate`/`extend`.

        `defer_prefill=True` only sets the prefill up: `session.advance_prefill(layers)` runs it a few layers
        at a time (what the scheduler does between decode steps); the result is the same.
        """
        method = self.method if method is None else self.resolve(method)
        chunk = self.prefill_chunk if prefill_chunk is None else _check_chunk(prefill_chunk)
        inputs.check_prompt(prompt, chat)
        messages = [{"role": "user", "content": prompt}] if chat else None
        ids = self.render_chat(messages) if chat else self.encode(prompt)
        self.check_lengths(len(ids), 1)
        return Session(self, ids, method, messages, chunk, defer_prefill)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
        method: str | Method | None = None,
        max_batch: int = 8,
        max_kv_bytes: int | None = None,
    ) -> Generation | list[Generation]:
        """Generate up to `max_new_tokens` after `prompt` (text or token ids); greedy by default.

        A list of prompts (texts, or lists of token ids) runs as a batch with continuous batching (up to
        `max_batch` sequences per decode step) and returns one `Generation` per prompt, each exactly what
        that prompt gives alone. `max_new_tokens` and `seed` may then be lists (one per prompt), and so may
        `stop`, as a list of per-prompt stop lists (a plain list of strings applies to every prompt).
        `max_kv_bytes` bounds the device KV of the running sequences (a sequence waits for room).
        """
        stream = self.stream(
            prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
            chat=chat, method=method, max_batch=max_batch, max_kv_bytes=max_kv_bytes,
        )  # fmt: skip
        for _ in stream:
            pass
        return stream.generations if isinstance(stream, BatchStream) else stream.generation

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
        method: str | Method | None = None,
        max_batch: int = 8,
        max_kv_bytes: int | None = None,
    ) -> GenerationStream | BatchStream:
        """Like `generate`, as an iterator of text pieces; its `generation` holds the result once exhausted.

        For a list of prompts, an iterator of `(index, piece)` pairs as the batch decodes; its `generations`
        (one per prompt) once exhausted.
        """
        if _is_batch(prompt):
            return self._batch_stream(
                list(prompt), max_batch, max_kv_bytes, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, seed=seed, stop=stop, chat=chat, method=method,
            )  # fmt: skip
        self.check_lengths(1, max_new_tokens)  # cheap checks before the prefill
        Sampling(temperature, top_p, seed)  # bad sampling settings or stop strings: refused before the prefill
        inputs.stop_strings(stop)
        session = self.start(prompt, method=method, chat=chat)
        return session.stream(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
            close_session=True,
        )  # fmt: skip

    def _batch_stream(self, prompts: list, max_batch: int, max_kv_bytes: int | None, **settings) -> BatchStream:
        if not prompts:
            raise ValueError("the batch of prompts is empty: pass at least one prompt")
        per_prompt = {key: _per_prompt(key, settings[key], len(prompts)) for key in ("max_new_tokens", "seed", "stop")}
        scheduler = Scheduler(self, max_batch=max_batch, max_kv_bytes=max_kv_bytes)
        for i, prompt in enumerate(prompts):
            try:
                scheduler.submit(prompt, **{**settings, **{key: values[i] for key, values in per_prompt.items()}})
            except (ValueError, TypeError) as err:
                raise type(err)(f"prompt {i} of the batch: {err}") from err
        return BatchStream(scheduler)

    def next_token_logits(
        self, prompt: str | Sequence[int], continuation: Sequence[int], *, method: str | Method | None = None
    ) -> torch.Tensor:
        """Teacher-forced next-token logits (fp32, `[len(continuation) + 1, vocab]`) under a method.

        Row 0 is the distribution after the prompt, row i after `continuation[:i]`: what fidelity
        measures (e.g. KL of a method vs dense along the dense tokens) need.
        """
        continuation = inputs.token_ids(continuation, self.model.spec.vocab_size, "continuation", allow_empty=True)
        session = self.start(prompt, method=method)
        self.check_lengths(len(session.tokens), len(continuation) + 1)
        counts = DecodeCounts.zeros(self.model.spec.num_layers)
        rows = [session.next_logits(counts)]
        for token in continuation:
            session.tokens.append(token)
            rows.append(session.next_logits(counts))
        session.close()
        return torch.stack(rows)

    def encode(self, prompt: str | Sequence[int], chat: bool = False, special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt (with the tokenizer's special tokens, or its chat template)."""
        inputs.check_prompt(prompt, chat)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "this engine has no tokenizer (the checkpoint came without tokenizer files), so it cannot "
                    "encode text: pass token ids, or load with tokenizer=..."
                )
            if chat:
                return self.render_chat([{"role": "user", "content": prompt}])
            return list(self.tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"])
        return inputs.token_ids(prompt, self.model.spec.vocab_size)

    def render_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template, ready for the assistant's reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat=True but this tokenizer has no chat template; pass chat=False")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    def check_lengths(self, context_len: int, max_new_tokens: int) -> None:
        """`max_new_tokens` is an int >= 1 and `context_len + max_new_tokens` fits the model's positions."""
        inputs.max_new_tokens(max_new_tokens)
        total, limit = context_len + max_new_tokens, self.model.spec.max_positions
        if total > limit:
            raise ValueError(
                f"the context ({context_len} tokens) plus max_new_tokens ({max_new_tokens}) is {total} tokens, "
                f"beyond the model's {limit} positions: shorten the prompt or ask for fewer new tokens"
            )

    # -- helpers ---------------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        found = (getattr(self.tokenizer, "eos_token_id", None), self.model.config.eos_token_id)
        ids: set[int] = set()
        for item in found:
            ids.update(item if isinstance(item, list) else [item])
        return {i for i in ids if i is not None}


def _check_chunk(chunk: int | None) -> int | None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"prefill_chunk must be None (no chunking) or an int >= 1 (rows per chunk), got {chunk!r}")
    return chunk


def _is_batch(prompt) -> bool:
    """A list of prompts (texts or token-id lists), as opposed to one token-id prompt (a list of ints)."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(isinstance(p, (str, list, tuple, torch.Tensor)) for p in prompt)
    )


def _per_prompt(name: str, value, count: int) -> list:
    """A setting given once (the same for every prompt) or as a list with one entry per prompt."""
    per_prompt = (
        isinstance(value, list)
        and len(value) > 0
        and (name != "stop" or all(v is None or isinstance(v, list) for v in value))
    )
    if not per_prompt:
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{name} has {len(value)} entries for {count} prompts: give one per prompt, or one value")
    return value
