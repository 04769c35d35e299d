"""Response bodies: a whole completion, or its server-sent-event stream, built from the worker's events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..generation import Generation
from .schemas import ChatChoice, ChatDelta, CompletionChoice, Reply, Usage

# The engine's reasons, as OpenAI names them: EOS and a stop string are both "stop".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def tokensieve_extra(generation: Generation) -> dict[str, Any]:
    """The extra field `tokensieve`: every decision of the generation, and what prefix reuse saved."""
    stats = generation.stats
    return {
        "stats": stats.to_dict(),
        "prefix_reused": stats.reused_tokens > 0,
        "reused_tokens": stats.reused_tokens,  # prompt tokens whose KV a retained session had
        "computed_tokens": stats.prompt_tokens,  # prompt tokens computed for this request
    }


def usage(generation: Generation) -> Usage:
    """OpenAI's usage: the whole conversation as the prompt, reused or not."""
    prompt, new = generation.stats.context_tokens, len(generation.token_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=new, total_tokens=prompt + new)


class Replies:
    """The bodies of one request: the same id, creation time and model in every chunk."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = Reply.new_id(chat)
        self.created = Reply.now()

    def whole(self, gen: Generation) -> dict[str, Any]:
        finish = FINISH_REASONS[gen.finish_reason]
        if self.chat:
            choice = ChatChoice(message=ChatDelta(role="assistant", content=gen.text), finish_reason=finish)
        else:
            choice = CompletionChoice(text=gen.text, finish_reason=finish)
        kind = "chat.completion" if self.chat else "text_completion"
        return self._reply(kind, [choice], usage=usage(gen), tokensieve=tokensieve_extra(gen))

    def piece(self, text: str | None, role: str | None = None, finish: str | None = None, **extra) -> dict[str, Any]:
        if self.chat:
            choice = ChatChoice(delta=ChatDelta(role=role, content=text), finish_reason=finish)
        else:
            choice = CompletionChoice(text=text or "", finish_reason=finish)
        return self._reply(self.chunk_kind, [choice], **extra)

    @property
    def chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    async def stream(
        self, first: tuple[str, Any], next_event: Callable[[], Awaitable[tuple[str, Any]]], include_usage: bool
    ) -> AsyncIterator[str]:
        """The SSE body: a chunk per piece, a last chunk with finish_reason and the stats, the usage chunk
        when asked for (`stream_options.include_usage`), then `data: [DONE]`; an error ends it as an event."""
        if self.chat:
            yield _event(self.piece("", role="assistant"))
        kind, value = first
        while kind == "piece":
            yield _event(self.piece(value))
            kind, value = await next_event()
        if kind == "error":
            yield _event(value.body())
        else:
            finish = FINISH_REASONS[value.finish_reason]
            yield _event(self.piece(None if self.chat else "", finish=finish, tokensieve=tokensieve_extra(value)))
            if include_usage:
                yield _event(self._reply(self.chunk_kind, [], usage=usage(value)))
        yield "data: [DONE]\n\n"

    def _reply(self, kind: str, choices: list, **extra) -> dict[str, Any]:
        body = Reply(id=self.id, object=kind, created=self.created, model=self.model, choices=choices, **extra)
        return body.model_dump(exclude_none=True)


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
