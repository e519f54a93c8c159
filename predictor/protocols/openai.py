"""OpenAI-compatible completions on ferry's own batcher, on KServe's FastAPI app.

    POST {prefix}/v1/completions     text completions, plain or streamed (server-sent events)
    GET  {prefix}/v1/models          the served model (and GET {prefix}/v1/models/{id})

`prefix` follows KServe's `KSERVE_OPENAI_ROUTE_PREFIX` convention (default `/openai`). KServe's
own OpenAI classes import vllm, so this module speaks the wire format itself.

- Every prompt of a request is one `GenerationRequest` through the same batcher as V1/V2/gRPC
  and /generate; streamed requests share batches with plain ones (the batcher groups by
  `Sampling` only, and greedy requests always share).
- Streaming: the engine's per-step callback feeds `Batcher.stream`; each token is detokenized
  incrementally (see `TextAssembler`) so that the concatenated chunks equal the plain text.
- `stop` is applied here, on the token stream: when a stop string appears the text is cut
  before it, finish_reason is "stop", and the stream is closed, which abandons the ticket so
  the engine stops that sequence.
- Errors come back in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from kserve.errors import InvalidInput
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from predictor.batcher import Batcher, BatcherError, GenerationRequest, Ticket
from predictor.engine import GREEDY, Sampling
from predictor.protocols.errors import (
    InvalidRequest,
    Overloaded,
    ServingError,
    TimedOut,
    from_batcher_error,
)
from predictor.protocols.requests import (
    build_request,
    check_count,
    check_max_new_tokens,
    check_text,
)
from predictor.tokenizer import shared_tokenizer

if TYPE_CHECKING:
    from predictor.model import FerryModel


def _default_prefix() -> str:
    prefix = os.environ.get("KSERVE_OPENAI_ROUTE_PREFIX", "/openai").strip()
    return "/" + prefix.strip("/") if prefix.strip("/") else ""


log = logging.getLogger("ferry.openai")
DEFAULT_PREFIX = _default_prefix()
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to, for now


# ---- errors ------------------------------------------------------------------------------


class OpenAIError(InvalidInput):
    """A client mistake (4xx) in OpenAI's terms. An InvalidInput, so ferry's metrics count it
    as a client error."""

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: Exception) -> JSONResponse:
    """ferry's errors (client mistakes, overload, deadline, engine failure) in OpenAI's shape."""
    if isinstance(exc, OpenAIError):
        body = error_body(exc.message, param=exc.param, code=exc.code)
        return JSONResponse(body, status_code=exc.status)
    if isinstance(exc, InvalidRequest):
        return JSONResponse(error_body(exc.reason, param=exc.field), status_code=400)
    if isinstance(exc, ServingError):
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return JSONResponse(server_error_body(exc), status_code=exc.http_status, headers=headers)
    log.error("unexpected error in an OpenAI route", exc_info=exc)
    return JSONResponse(_internal_error_body(exc), status_code=500)


def _internal_error_body(exc: Exception) -> dict[str, Any]:
    message = f"internal error: {type(exc).__name__}"
    return error_body(message, type="server_error", code="internal_error")


def server_error_body(exc: ServingError) -> dict[str, Any]:
    if isinstance(exc, Overloaded):
        code = "overloaded"
    elif isinstance(exc, TimedOut):
        code = "timeout"
    else:
        code = "engine_error"
    return error_body(str(exc), type="server_error", code=code)


def _from_validation_error(error: ValidationError) -> OpenAIError:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    kind = first["type"]
    if kind == "extra_forbidden":
        return OpenAIError(f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return OpenAIError(f"You must provide a {param} parameter.", param=param)
    message = first["msg"].removeprefix("Value error, ")
    if "input" in first and kind != "value_error":
        message = f"{message}, got {first['input']!r}"
    return OpenAIError(f"{param}: {message}", param=param)


# ---- the request -------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. Strict: wrong types are 400s, never coerced; unknown fields too."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: Any
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # not OpenAI's; vLLM's extension (extra_body)
    n: int | None = None
    best_of: int | None = None
    stop: Any = Field(None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored, as it carries no generation setting

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        if (
            isinstance(value, list)
            and value
            and all(isinstance(item, int | list) for item in value)
        ):
            raise ValueError("token-id prompts are not supported; send text")
        raise ValueError(f"must be a string or a list of strings, got {type(value).__name__}")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return tuple(dict.fromkeys(stops))

    @property
    def prompts(self) -> list[str]:
        return list(self.prompt)

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop)

    def check_supported(self) -> None:
        """OpenAI parameters ferry accepts only at their neutral value: a clear 400 otherwise."""
        unsupported: list[tuple[str, bool, str]] = [
            ("n", self.n not in (None, 1), "only n = 1 is supported (send a list of prompts)"),
            ("best_of", self.best_of not in (None, 1), "only best_of = 1 is supported"),
            ("logprobs", self.logprobs is not None, "logprobs are not supported"),
            ("echo", self.echo, "echo is not supported"),
            ("suffix", self.suffix is not None, "suffix (insertion) is not supported"),
            ("presence_penalty", self.presence_penalty not in (None, 0), "only 0 is supported"),
            ("frequency_penalty", self.frequency_penalty not in (None, 0), "only 0 is supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            (
                "stream_options",
                self.stream_options is not None and not self.stream,
                "stream_options is only allowed when stream is true",
            ),
        ]
        for param, bad, message in unsupported:
            if bad:
                raise OpenAIError(f"{param}: {message}", param=param)

    def sampling(self) -> Sampling:
        """temperature 0 (or top_k 1) is greedy, which every greedy request shares a batch with.
        Otherwise sample: OpenAI's defaults temperature 1 and top_p 1, top_k unlimited unless
        given. `seed` is accepted but not part of the settings (see README.md, "OpenAI-compatible API")."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_k = 0 if self.top_k in (None, -1) else self.top_k
        if temperature == 0 or top_k == 1:
            return GREEDY
        top_p = 1.0 if self.top_p is None else self.top_p
        return Sampling(temperature=temperature, top_k=top_k, top_p=top_p)


def parse_completion(payload: Any) -> CompletionRequest:
    if not isinstance(payload, dict):
        raise OpenAIError("The request body must be a JSON object.")
    try:
        request = CompletionRequest.model_validate(payload)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None
    request.check_supported()
    return request


# ---- incremental detokenization, stop strings ---------------------------------------------


class TextAssembler:
    """Token strings in, text deltas out, for one sequence.

    The deltas' concatenation equals `decode(all tokens)` (the plain response's text), cut
    before the first stop string. Two things are held back until they are settled: a trailing
    U+FFFD (an incomplete UTF-8 sequence that the next byte token may complete) and a trailing
    piece of text that could be the start of a stop string.
    """

    def __init__(self, decode: Callable[[Sequence[str]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = tuple(stops)
        self.tokens: list[str] = []
        self._base = 0  # tokens before this index decode to `_settled` and end on a character
        self._settled = ""
        self.text = ""  # what was handed out so far
        self.stopped = False  # a stop string was found

    def push(self, token: str) -> str:
        """The new text this token makes certain (often "", e.g. half a UTF-8 character)."""
        self.tokens.append(token)
        tail = self._decode(self.tokens[self._base :])
        if tail.endswith(REPLACEMENT):
            return self._emit(self._settled + tail.rstrip(REPLACEMENT), final=False)
        self._settled += tail
        self._base = len(self.tokens)
        return self._emit(self._settled, final=False)

    def finish(self) -> str:
        """The end of the sequence: whatever was held back."""
        if self.stopped:
            return ""
        return self._emit(self._settled + self._decode(self.tokens[self._base :]), final=True)

    def _emit(self, visible: str, *, final: bool) -> str:
        if self.stopped:
            return ""
        start = len(self.text)
        end = len(visible)
        hits = [i for i in (visible.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        elif not final:
            end -= self._partial_stop(visible, start)
        delta = visible[start:end]
        self.text += delta
        return delta

    def _partial_stop(self, visible: str, start: int) -> int:
        """Length of the longest suffix of visible[start:] that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(visible) - start), longest, -1):
                if visible.endswith(stop[:k]):
                    longest = k
                    break
        return longest


# ---- running a completion through the batcher ----------------------------------------------


@dataclass
class ChoiceResult:
    index: int
    prompt_tokens: int
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class _Event:
    index: int
    delta: str
    finish_reason: str | None = None
    error: Exception | None = None


@dataclass
class Completion:
    """The choices of one request, each a ticket read by its own pump task; events (text deltas,
    finishes, failures) are merged into one queue in the order they happen."""

    batcher: Batcher
    requests: list[GenerationRequest]
    stops: tuple[str, ...]
    choices: list[ChoiceResult] = field(default_factory=list)
    events: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    _pumps: list[asyncio.Task[None]] = field(default_factory=list)
    _started: list[bool] = field(default_factory=list)

    async def start(self) -> None:
        """Admits every prompt and starts its pump; if one is refused, the admitted ones are
        abandoned and the BatcherError is raised."""
        decode = shared_tokenizer().decode
        refused: BatcherError | None = None
        for index, request in enumerate(self.requests):
            try:
                ticket = self.batcher.submit(request)
            except BatcherError as exc:
                refused = exc
                break
            self.choices.append(ChoiceResult(index, len(request.prompt_tokens)))
            self._started.append(False)
            assembler = TextAssembler(decode, self.stops)
            self._pumps.append(asyncio.ensure_future(self._pump(index, ticket, assembler)))
        # Let every pump reach its first wait inside Batcher.stream: from then on, cancelling a
        # pump abandons its ticket (a task cancelled before it ever ran would leave it admitted).
        await asyncio.sleep(0)
        if refused is not None:
            await self.close()
            raise refused

    async def _pump(self, index: int, ticket: Ticket, assembler: TextAssembler) -> None:
        self._started[index] = True
        choice = self.choices[index]
        # Batcher.stream is an async generator: closing it early abandons the ticket.
        stream = self.batcher.stream(ticket)
        try:
            async with contextlib.aclosing(stream):  # leaving early abandons the ticket
                async for token in stream:
                    delta = assembler.push(token)
                    if assembler.stopped:
                        self.batcher.stop_early(ticket)
                        break
                    if delta:
                        self.events.put_nowait(_Event(index, delta))
            delta = assembler.finish()
            choice.text = assembler.text
            choice.completion_tokens = len(assembler.tokens)
            choice.finish_reason = "stop" if assembler.stopped else "length"
            self.events.put_nowait(_Event(index, delta, choice.finish_reason))
        except Exception as exc:  # BatcherError, or a bug here: either way the request fails
            self.events.put_nowait(_Event(index, "", error=exc))

    async def iterate(self) -> AsyncIterator[_Event]:
        """Events until every choice finished; raises the first failure."""
        remaining = len(self.choices)
        while remaining:
            event = await self.events.get()
            if event.error is not None:
                raise event.error
            if event.finish_reason is not None:
                remaining -= 1
            yield event

    async def close(self) -> None:
        """Stops every unfinished sequence (client gone, a failure, or the end)."""
        for started, pump in zip(self._started, self._pumps, strict=False):
            if started:
                pump.cancel()
        if self._pumps:
            await asyncio.gather(*self._pumps, return_exceptions=True)


# ---- responses -----------------------------------------------------------------------------


def _usage(choices: Sequence[ChoiceResult]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@dataclass
class _Envelope:
    model: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, choices: Sequence[ChoiceResult]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": _usage(choices),
        }

    def chunk(self, event: _Event, *, with_usage: bool) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": event.index,
                    "text": event.delta,
                    "logprobs": None,
                    "finish_reason": event.finish_reason,
                }
            ],
        }
        if with_usage:
            body["usage"] = None
        return _sse(body)

    def usage_chunk(self, choices: Sequence[ChoiceResult]) -> bytes:
        return _sse(
            {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": None,
                "choices": [],
                "usage": _usage(choices),
            }
        )


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"


class CompletionStream(StreamingResponse):
    """Server-sent events for one completion. Owns the completion's tickets and its metrics
    record: however the response ends (done, failed, client gone), its unfinished sequences
    are stopped and the request is counted once."""

    def __init__(
        self,
        completion: Completion,
        envelope: _Envelope,
        include_usage: bool,
        observed: AsyncExitStack,
    ) -> None:
        self.completion = completion
        self.envelope = envelope
        self.include_usage = include_usage
        self.observed = observed
        self.finished = False
        self.error: BaseException | None = None
        super().__init__(
            self._events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(self) -> AsyncIterator[bytes]:
        try:
            async for event in self.completion.iterate():
                if event.delta or event.finish_reason:
                    yield self.envelope.chunk(event, with_usage=self.include_usage)
            if self.include_usage:
                yield self.envelope.usage_chunk(self.completion.choices)
        except Exception as exc:
            # Headers are sent: report the failure as an event (the openai client raises it).
            if isinstance(exc, BatcherError):
                self.error = from_batcher_error(exc, retry_after_s=1)
                yield _sse(server_error_body(self.error))
            else:
                log.error("OpenAI stream failed", exc_info=exc)
                self.error = exc
                yield _sse(_internal_error_body(exc))
        yield DONE
        self.finished = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome: BaseException | None = None
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            outcome = asyncio.CancelledError()
        except BaseException as exc:
            outcome = exc
            raise
        finally:
            await self.completion.close()
            if outcome is None:
                outcome = self.error if self.finished else asyncio.CancelledError()
            await self.observed.__aexit__(type(outcome) if outcome else None, outcome, None)


# ---- routes --------------------------------------------------------------------------------


def _model_card(model: FerryModel) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "ferry"}


def register_openai_routes(app: FastAPI, model: FerryModel, prefix: str = DEFAULT_PREFIX) -> None:
    """Adds the OpenAI routes for `model` to KServe's FastAPI app (same port, batcher, metrics)."""
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""

    @app.get(f"{prefix}/v1/models", response_model=None)
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card(model)]})

    @app.get(f"{prefix}/v1/models/{{model_id:path}}", response_model=None)
    async def retrieve_model(model_id: str) -> JSONResponse:
        if model_id != model.name:
            return error_response(_model_not_found(model_id))
        return JSONResponse(_model_card(model))

    @app.post(f"{prefix}/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        try:
            return await _completions(model, request)
        except Exception as exc:
            return error_response(exc)


def _model_not_found(name: str) -> OpenAIError:
    return OpenAIError(
        f"The model `{name}` does not exist.", status=404, param="model", code="model_not_found"
    )


async def _completions(model: FerryModel, http_request: Request) -> Response:
    async with AsyncExitStack() as observed:
        await observed.enter_async_context(model.observe("openai"))
        model.check_accepting()
        try:
            payload = orjson.loads(await http_request.body())
        except orjson.JSONDecodeError as exc:
            raise OpenAIError(f"The request body is not valid JSON ({exc}).") from None
        body = parse_completion(payload)
        if body.model != model.name:
            raise _model_not_found(body.model)
        limits = model.limits
        prompts = body.prompts
        check_count(len(prompts), "prompt", limits)
        max_tokens = check_max_new_tokens(body.max_tokens, "max_tokens", limits)
        sampling = body.sampling()
        streamed = body.stream or bool(body.stops)
        requests = [
            build_request(
                model.generator,
                check_text(text, "prompt" if len(prompts) == 1 else f"prompt[{i}]"),
                max_tokens,
                limits,
                field="prompt" if len(prompts) == 1 else f"prompt[{i}]",
                sampling=sampling,
                stream=streamed,
            )
            for i, text in enumerate(prompts)
        ]
        envelope = _Envelope(model.name)

        if not streamed:  # the plain path: no per-token hand-offs at all
            outputs = await model.generate(requests)
            choices = [
                ChoiceResult(i, len(r.prompt_tokens), o.text, o.generated_tokens, "length")
                for i, (r, o) in enumerate(zip(requests, outputs, strict=True))
            ]
            return JSONResponse(envelope.completion(choices))

        completion = Completion(model.batcher, requests, body.stops)
        try:
            await completion.start()
        except BatcherError as exc:
            raise from_batcher_error(exc, model.settings.retry_after_s) from None

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            # The response now owns the metrics record and the tickets.
            return CompletionStream(completion, envelope, include_usage, observed.pop_all())

        try:  # not streamed, but with stop strings: the same token path, collected
            async for _ in completion.iterate():
                pass
        except BatcherError as exc:
            raise from_batcher_error(exc, model.settings.retry_after_s) from None
        finally:
            await completion.close()
        return JSONResponse(envelope.completion(completion.choices))


__all__ = [
    "DEFAULT_PREFIX",
    "CompletionRequest",
    "OpenAIError",
    "TextAssembler",
    "error_response",
    "parse_completion",
    "register_openai_routes",
]
