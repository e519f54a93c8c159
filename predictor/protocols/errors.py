"""Errors as values with a status, in one place: each maps to one HTTP status and one gRPC code.

`ServingError` subclasses grpc_interceptor's GrpcException, so KServe's gRPC interceptor turns
it into the right status code; ferry's REST exception handler turns it into the HTTP status
(with Retry-After on 503).
"""

from __future__ import annotations

from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InvalidInput
from starlette.requests import Request
from starlette.responses import JSONResponse

from predictor import batcher


class InvalidRequest(InvalidInput):
    """A client mistake: 400 / INVALID_ARGUMENT. The message names the field and the limit."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")


class ServingError(GrpcException):
    http_status: int = 500
    status_code: StatusCode = StatusCode.INTERNAL
    retry_after_s: int | None = None

    def __init__(self, details: str, retry_after_s: int | None = None) -> None:
        super().__init__(details)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return str(self.details)


class Overloaded(ServingError):
    http_status = 503
    status_code = StatusCode.UNAVAILABLE


class TimedOut(ServingError):
    http_status = 504
    status_code = StatusCode.DEADLINE_EXCEEDED


class EngineError(ServingError):
    http_status = 500
    status_code = StatusCode.INTERNAL


def from_batcher_error(error: batcher.BatcherError, retry_after_s: int) -> ServingError:
    if isinstance(error, batcher.QueueFull | batcher.Draining | batcher.Unavailable):
        return Overloaded(str(error), retry_after_s)
    if isinstance(error, batcher.DeadlineExceeded):
        return TimedOut(str(error))
    return EngineError(str(error))


def outcome_of(error: BaseException) -> str:
    """The closed `outcome` label value for ferry_requests_total."""
    if isinstance(error, InvalidInput):
        return "client_error"
    if isinstance(error, Overloaded):
        return "rejected"
    if isinstance(error, TimedOut):
        return "timeout"
    return "error"


def error_response(error: ServingError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
    return JSONResponse({"error": str(error)}, status_code=error.http_status, headers=headers)


async def serving_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServingError)
    return error_response(exc)
