"""OpenAI chat completions: POST {prefix}/v1/chat/completions, plain or streamed.

Messages become one prompt through the chat template (`predictor.chat_template`, the
`chat_template` setting); the prompt then goes through the same batcher, stop strings,
sampling and EOS handling as a text completion. One choice per request (n = 1).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from predictor import request_context
from predictor.chat_template import ChatTemplateError, load_chat_template
from predictor.engine import Sampling
from predictor.protocols.openai.logprobs import chat_logprobs, gather_scores
from predictor.protocols.openai.responses import ChoiceResult, Envelope, sse, usage
from predictor.protocols.openai.schema import (
    MAX_TOP_K,
    MIN_TOP_P,
    OpenAIError,
    OpenAIRequest,
    StreamOptions,
    check_stops,
    common_unsupported,
    parse_request,
    raise_unsupported,
    read_request,
    sampling_of,
)
from predictor.protocols.openai.serving import Completion, CompletionStream, choice
from predictor.protocols.requests import build_request, check_max_new_tokens, off_loop

if TYPE_CHECKING:
    from predictor.model import FerryModel


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        parts = self.content if isinstance(self.content, list) else None
        content = "".join(part.text for part in parts) if parts is not None else str(self.content or "")
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions (strict like completions)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)  # vLLM's extension (extra_body)
    ignore_eos: bool = False  # vLLM's extension (extra_body)
    n: int | None = None
    stop: Any = Field(None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        return check_stops(value)

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop)

    def check_supported(self) -> None:
        unsupported: list[tuple[str, bool, str]] = [
            ("n", self.n not in (None, 1), "only n = 1 is supported"),
            ("logprobs", bool(self.logprobs) and self.stream, "logprobs are not supported when streaming"),
            (
                "top_logprobs",
                self.top_logprobs is not None and not (self.logprobs and 0 <= self.top_logprobs <= 5),
                "must be between 0 and 5, with logprobs true",
            ),
        ]
        raise_unsupported([*unsupported, *common_unsupported(self)])

    def sampling(self) -> Sampling:
        return sampling_of(self.temperature, self.top_k, self.top_p)

    def token_limit(self) -> tuple[int | None, str]:
        """max_completion_tokens (OpenAI's current name) over max_tokens (deprecated)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


def parse_chat(payload: Any) -> ChatCompletionRequest:
    return parse_request(payload, ChatCompletionRequest)


@dataclass
class ChatEnvelope(Envelope):
    """Chat bodies: `chat.completion` answers and `chat.completion.chunk` events."""

    id: str = field(default_factory=lambda: f"chatcmpl-{request_context.id_suffix()}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self) -> dict[str, Any]:
        return {**super()._head(), "object": "chat.completion.chunk"}

    def completion(self, choices: Sequence[ChoiceResult]) -> dict[str, Any]:
        return {
            **super()._head(),
            "object": "chat.completion",
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": usage(choices),
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None, with_usage: bool) -> bytes:
        body = {
            **self._head(),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if with_usage:
            body["usage"] = None
        return sse(body)

    def opening(self, *, with_usage: bool) -> bytes:
        return self._chunk({"role": "assistant", "content": ""}, None, with_usage)

    def chunk(self, index: int, text: str, finish_reason: str | None, *, with_usage: bool) -> bytes:
        return self._chunk({"content": text} if text else {}, finish_reason, with_usage)


async def chat_completions(model: FerryModel, raw_body: bytes) -> dict[str, Any] | CompletionStream:
    """POST /v1/chat/completions: the JSON answer, or the event stream the caller then sends."""
    model.check_accepting()
    body = read_request(raw_body, ChatCompletionRequest, model.name)
    limits = model.limits
    template = load_chat_template(model.settings.chat_template)
    try:
        # bos_token/eos_token are empty: ferry's tokenizer adds OPT's leading </s> itself, and a
        # special token written into the prompt's text would be split like any other text.
        prompt = template.render([m.as_template_input() for m in body.messages])
    except ChatTemplateError as exc:
        raise OpenAIError(f"messages: {exc}", param="messages") from None
    if not prompt:
        raise OpenAIError("messages: the chat template rendered an empty prompt", param="messages")
    requested, limit_field = body.token_limit()
    max_tokens = check_max_new_tokens(requested, limit_field, limits)
    request = await off_loop(  # a long conversation is tokenised off the event loop
        len(prompt),
        build_request,
        model.inference_engine,
        prompt,
        max_tokens,
        limits,
        field="messages",
        sampling=body.sampling(),
        incremental=body.stream,
        stop=body.stops,
        ignore_eos=body.ignore_eos,
    )
    envelope = ChatEnvelope(model.name)
    if not body.stream:
        (output,) = await model.generate([request])
        result = choice(0, request, output)
        if body.logprobs:
            (scored,) = await gather_scores(model, [request.prompt_tokens], [output.tokens], body.top_logprobs or 0)
            result.logprobs = chat_logprobs(
                len(request.prompt_tokens), output.tokens, scored, decode=model.batcher.decode
            )
        return envelope.completion([result])
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return CompletionStream(Completion(model.batcher, [request]), envelope, include_usage)


def template_card(model: FerryModel) -> dict[str, Any]:
    """The chat template in use, for /v1/models."""
    return load_chat_template(model.settings.chat_template).describe()
