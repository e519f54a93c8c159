"""OpenAI completions: the request schema and client errors in OpenAI's shape."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from kserve.errors import InvalidInput
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from predictor.engine import GREEDY, Sampling
from predictor.logsafe import MAX_MESSAGE_CHARS, clip

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
# What CTranslate2 accepts (it raises otherwise, failing the whole batch): top_k at most the
# vocabulary (OPT's 50,272), top_p that stays above 0 as a float32.
MAX_TOP_K = 50_272
MIN_TOP_P = 1e-9


# ---- errors ------------------------------------------------------------------------------


class OpenAIError(InvalidInput):
    """A client mistake (4xx) in OpenAI's terms. An InvalidInput, so ferry's metrics count it
    as a client error."""

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)  # it may quote what the client sent
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


def from_validation_error(error: ValidationError) -> OpenAIError:
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


def check_stops(value: Any) -> tuple[str, ...]:
    """`stop`: a string or up to 4 non-empty strings (completions and chat alike)."""
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """What every OpenAI request body shares. Strict: wrong types are 400s, never coerced;
    unknown fields too."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str

    def check_supported(self) -> None:
        """Parameters accepted only at their neutral value: a clear 400 otherwise."""


RequestT = TypeVar("RequestT", bound=OpenAIRequest)


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions."""

    prompt: Any
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)  # not OpenAI's; vLLM's extension (extra_body)
    ignore_eos: bool = False  # vLLM's extension (extra_body): exactly max_tokens, for benchmarks
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
        return check_stops(value)

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
            ("logprobs", self.logprobs is not None and not 0 <= self.logprobs <= 5, "must be between 0 and 5"),
            ("logprobs", self.logprobs is not None and self.stream, "logprobs are not supported when streaming"),
            ("echo", self.echo and self.stream, "echo is not supported when streaming"),
            ("max_tokens", self.max_tokens == 0 and not self.echo, "0 is only allowed with echo (prompt scoring)"),
            ("suffix", self.suffix is not None, "suffix (insertion) is not supported"),
        ]
        raise_unsupported([*unsupported, *common_unsupported(self)])

    def sampling(self) -> Sampling:
        return sampling_of(self.temperature, self.top_k, self.top_p)


def sampling_of(temperature: float | None, top_k: int | None, top_p: float | None) -> Sampling:
    """temperature 0 (or top_k 1) is greedy, which every greedy request shares a batch with.
    Otherwise sample: OpenAI's defaults temperature 1 and top_p 1, top_k unlimited unless
    given. `seed` is accepted but not part of the settings (see docs/openai.md)."""
    temperature = 1.0 if temperature is None else temperature
    top_k = 0 if top_k in (None, -1) else top_k
    if temperature == 0 or top_k == 1:
        return GREEDY
    return Sampling(temperature=temperature, top_k=top_k, top_p=1.0 if top_p is None else top_p)


def common_unsupported(request: Any) -> list[tuple[str, bool, str]]:
    """The checks completions and chat completions share (parameters only at their neutral value)."""
    return [
        ("presence_penalty", request.presence_penalty not in (None, 0), "only 0 is supported"),
        ("frequency_penalty", request.frequency_penalty not in (None, 0), "only 0 is supported"),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
        (
            "stream_options",
            request.stream_options is not None and not request.stream,
            "stream_options is only allowed when stream is true",
        ),
    ]


def raise_unsupported(checks: list[tuple[str, bool, str]]) -> None:
    """A 400 naming the first parameter whose check failed."""
    for param, bad, message in checks:
        if bad:
            raise OpenAIError(f"{param}: {message}", param=param)


def parse_request(payload: Any, schema: type[RequestT]) -> RequestT:
    """A JSON object validated against `schema` (strict: wrong types and unknown fields are
    400s in OpenAI's shape), then its own unsupported-parameter checks."""
    if not isinstance(payload, dict):
        raise OpenAIError("The request body must be a JSON object.")
    try:
        request = schema.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    request.check_supported()
    return request


def read_request(raw_body: bytes, schema: type[RequestT], model_name: str) -> RequestT:
    """The body of a POST: JSON, validated, for the served model (else 404 model_not_found)."""
    try:
        payload = orjson.loads(raw_body)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(f"The request body is not valid JSON ({exc}).") from None
    request = parse_request(payload, schema)
    if request.model != model_name:
        raise model_not_found(request.model)
    return request


def parse_completion(payload: Any) -> CompletionRequest:
    return parse_request(payload, CompletionRequest)




def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(
        f"The model `{name}` does not exist.", status=404, param="model", code="model_not_found"
    )
