"""Every failure, mapped once: HTTP status, gRPC code, OpenAI error type and code, and the
`outcome` label of ferry_requests_total. Protocols raise or receive these and look them up here.

`ServingError` subclasses grpc_interceptor's GrpcException, so KServe's gRPC interceptor turns
it into the right status code; ferry's HTTP front turns it into the HTTP status (with
Retry-After on 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass

from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InvalidInput

from predictor import batcher
from predictor.logsafe import MAX_MESSAGE_CHARS, clip

log = logging.getLogger("ferry.errors")


class InvalidRequest(InvalidInput):
    """A client mistake: 400 / INVALID_ARGUMENT. The message names the field and the limit."""

    def __init__(self, field: str, problem: str, *, status: int = 400) -> None:
        self.field = field
        self.status = status
        # Bounded: a problem may quote what the client sent (names of unknown fields, ...).
        super().__init__(clip(f"{field}: {problem}", MAX_MESSAGE_CHARS))


@dataclass(frozen=True)
class Failure:
    http_status: int
    grpc_code: StatusCode
    openai_type: str
    openai_code: str | None
    outcome: str  # ferry_requests_total{outcome}
    retry_after: bool = False


CLIENT_ERROR = Failure(400, StatusCode.INVALID_ARGUMENT, "invalid_request_error", None, "client_error")
OVERLOADED = Failure(503, StatusCode.UNAVAILABLE, "server_error", "overloaded", "rejected", retry_after=True)
TIMED_OUT = Failure(504, StatusCode.DEADLINE_EXCEEDED, "server_error", "timeout", "timeout")
ENGINE_FAILED = Failure(500, StatusCode.INTERNAL, "server_error", "engine_error", "error")
CANCELLED = Failure(499, StatusCode.CANCELLED, "server_error", "cancelled", "cancelled")
INTERNAL = Failure(500, StatusCode.INTERNAL, "server_error", "internal_error", "error")

# The batcher's outcomes, in the order they are looked up (first match wins).
_BY_TYPE: tuple[tuple[type[BaseException], Failure], ...] = (
    (InvalidInput, CLIENT_ERROR),
    (batcher.QueueFull, OVERLOADED),
    (batcher.Draining, OVERLOADED),
    (batcher.Unavailable, OVERLOADED),
    (batcher.DeadlineExceeded, TIMED_OUT),
    (batcher.EngineFailed, ENGINE_FAILED),
    (asyncio.CancelledError, CANCELLED),
)


def failure_of(error: BaseException) -> Failure:
    if isinstance(error, ServingError):
        return error.failure
    for kind, failure in _BY_TYPE:
        if isinstance(error, kind):
            return failure
    return INTERNAL


class ServingError(GrpcException):
    """A failure carrying its row of the table (status code for KServe's gRPC interceptor)."""

    failure: Failure = INTERNAL

    def __init__(self, details: str, failure: Failure = INTERNAL, retry_after_s: int | None = None) -> None:
        self.failure = failure
        self.status_code = failure.grpc_code
        super().__init__(details)
        self.retry_after_s = retry_after_s if failure.retry_after else None

    @property
    def http_status(self) -> int:
        return self.failure.http_status

    def __str__(self) -> str:
        return str(self.details)


def serving_error(error: BaseException, retry_after_s: int) -> ServingError:
    """The batcher's error as a ServingError (what KServe's gRPC and REST layers can carry)."""
    if isinstance(error, ServingError):
        return error
    return ServingError(str(error), failure_of(error), retry_after_s)


def outcome_of(error: BaseException) -> str:
    """The closed `outcome` label value for ferry_requests_total."""
    return failure_of(error).outcome


def internal_message(error: BaseException) -> str:
    """An unexpected failure (a bug, not the client's doing): logged once with its traceback
    under a fresh error id; the client gets that id and no internal text."""
    error_id = getattr(error, "ferry_error_id", None)
    if error_id is None:
        error_id = uuid.uuid4().hex[:12]
        with contextlib.suppress(AttributeError):
            error.ferry_error_id = error_id  # type: ignore[attr-defined]
        log.error("internal error %s serving a request", error_id, exc_info=error)
    return f"internal error (error id {error_id}); the details are in the server log"


def public_message(error: BaseException) -> str:
    """What a client may read about a failure: its own mistakes and the server's state in
    full (bounded), an unexpected failure only as an error id."""
    if failure_of(error) is INTERNAL:
        return internal_message(error)
    return clip(str(error), MAX_MESSAGE_CHARS)
