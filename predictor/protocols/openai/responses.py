"""OpenAI completions: response bodies, server-sent event chunks and error bodies."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from predictor import request_context
from predictor.protocols.errors import InvalidRequest, failure_of, public_message
from predictor.protocols.openai.schema import OpenAIError, error_body

DONE = b"data: [DONE]\n\n"


@dataclass
class ChoiceResult:
    index: int
    prompt_tokens: int
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


def usage(choices: Sequence[ChoiceResult]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


@dataclass
class Envelope:
    """What every body of one completion shares: id (ending with the request's X-Request-Id),
    creation time, model."""

    model: str
    id: str = field(default_factory=lambda: f"cmpl-{request_context.id_suffix()}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def completion(self, choices: Sequence[ChoiceResult]) -> dict[str, Any]:
        return {
            **self._head(),
            "choices": [
                {"index": c.index, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                for c in choices
            ],
            "usage": usage(choices),
        }

    def opening(self, *, with_usage: bool) -> bytes:
        """The event a stream starts with, before any text (none for text completions)."""
        return b""

    def chunk(self, index: int, text: str, finish_reason: str | None, *, with_usage: bool) -> bytes:
        body = {
            **self._head(),
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        }
        if with_usage:
            body["usage"] = None
        return sse(body)

    def usage_chunk(self, choices: Sequence[ChoiceResult]) -> bytes:
        return sse({**self._head(), "choices": [], "usage": usage(choices)})


def error_status_and_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """Any failure in OpenAI's shape, from the one failure table."""
    if isinstance(error, OpenAIError):
        return error.status, error_body(error.message, param=error.param, code=error.code)
    if isinstance(error, InvalidRequest):
        return error.status, error_body(error.reason, param=error.field)
    failure = failure_of(error)
    message = public_message(error)
    return failure.http_status, error_body(message, type=failure.openai_type, code=failure.openai_code)
