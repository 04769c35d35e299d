"""The OpenAI request and response bodies the server speaks, as pydantic models.

Requests accept the fields the OpenAI clients send; a field we do not implement is refused (422) rather
than silently ignored, except where its value is the neutral one (`n=1`, penalties 0, no logprobs).
tokensieve's own settings travel in the extra field `tokensieve` (the `openai` client's `extra_body`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokensieveOptions(_Strict):
    """The extra field `tokensieve` of a request: tokensieve's own settings."""

    method: str | None = Field(None, description="a method name or spec, e.g. 'omnikv(budget=0.1)'")
    reuse: bool = Field(True, description="continue a retained session whose conversation this request extends")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the chat API's newer name for max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted at their neutral values only (clients send them by default); anything else is refused
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    tokensieve: TokensieveOptions = Field(default_factory=TokensieveOptions)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value):
        if value != 1:
            raise ValueError("tokensieve serve returns one choice per request: leave n at 1")
        return value

    @field_validator("presence_penalty", "frequency_penalty", "logprobs")
    @classmethod
    def _not_implemented(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not implemented by tokensieve serve: leave it unset (or 0)")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, list) and (len(value) > 4 or not all(value)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(min_length=1)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("echo is not implemented by tokensieve serve: leave it false")
        return value


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


# -- responses -------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatDelta | None = None
    delta: ChatDelta | None = None
    finish_reason: str | None = None
    logprobs: None = None


class Reply(BaseModel):
    """A completion, chat completion or one of their stream chunks (`object` tells which)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice] | list[ChatChoice]
    usage: Usage | None = None
    tokensieve: dict[str, Any] | None = None  # the generation's stats and the reuse decision

    @staticmethod
    def new_id(chat: bool) -> str:
        return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]

    @staticmethod
    def now() -> int:
        return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "tokensieve"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
