"""A request's prompt as the engine will see it: its text (when it has one) and its token ids."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ServeError
from .schemas import ChatRequest, CompletionRequest


@dataclass(frozen=True)
class Prompt:
    """`text` is what prefix reuse matches on (None for a token-id prompt); `ids` what a fresh session prefills;
    `chat`: rendered by the chat template (whose text carries its own special tokens) or a plain completion."""

    text: str | None
    ids: list[int]
    chat: bool = False


def completion_prompt(engine, request: CompletionRequest) -> Prompt:
    """A completion's prompt: text (the tokenizer adds its special tokens, as `engine.generate` does) or ids."""
    try:
        ids = engine.encode(request.prompt)
    except (ValueError, TypeError) as err:
        raise ServeError(422, f"prompt: {err}", "prompt") from err
    return Prompt(request.prompt if isinstance(request.prompt, str) else None, ids)


def chat_prompt(engine, request: ChatRequest) -> Prompt:
    """The messages rendered by the tokenizer's chat template (`--chat-template` sets one), ready for the reply."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError(
            400,
            "this model's tokenizer has no chat template: use /v1/completions, or start the server with "
            "--chat-template FILE (a Jinja template)",
            "messages",
        )
    messages = [message.model_dump(exclude_none=True) for message in request.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return Prompt(text, encode_piece(tokenizer, text), chat=True)


def encode_piece(tokenizer, text: str) -> list[int]:
    """Token ids of text that already carries its special tokens (a rendered chat, or a new turn's suffix)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_length(engine, prompt: Prompt, max_tokens: int | None, limits) -> int:
    """The number of tokens to generate; 413 when the prompt (plus `max_tokens`) does not fit."""
    positions = engine.model.spec.max_positions
    prompt_limit = min(limits.max_prompt_tokens or positions, positions - 1)
    if len(prompt.ids) > prompt_limit:
        raise ServeError(
            413,
            f"the prompt has {len(prompt.ids)} tokens, beyond this server's limit of {prompt_limit} "
            f"(the model has {positions} positions): shorten the prompt",
            "prompt",
        )
    if max_tokens is None:
        return min(limits.max_tokens, positions - len(prompt.ids))
    if max_tokens > limits.max_tokens:
        raise ServeError(
            422, f"max_tokens {max_tokens} is above this server's limit of {limits.max_tokens}", "max_tokens"
        )
    if len(prompt.ids) + max_tokens > positions:
        raise ServeError(
            413,
            f"the prompt ({len(prompt.ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
            f"{positions} positions: shorten the prompt or lower max_tokens",
            "max_tokens",
        )
    return max_tokens
