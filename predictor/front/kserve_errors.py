"""KServe's REST and gRPC servers as ferry serves them: the model repository routes only when
enabled, and errors answered without tracebacks for client mistakes or internal text for
anyone (KServe's own handlers log an ERROR traceback for every 4xx and answer a 500 with
`TypeError : ...`).

- client mistakes (InvalidInput, FastAPI validation): 400/422 / INVALID_ARGUMENT, the message
  bounded, nothing logged;
- model not found / not ready, server not live / ready: 404 / 503, NOT_FOUND / UNAVAILABLE;
- anything else: 500 / INTERNAL with an error id; logged once, with its traceback.
"""

from __future__ import annotations

from typing import Any

import fastapi
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from grpc import StatusCode
from grpc_interceptor import AsyncExceptionToStatusInterceptor
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerNotLive,
    ServerNotReady,
    UnsupportedProtocol,
)
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer
from kserve.utils.utils import to_headers
from starlette.requests import Request

from predictor.logsafe import MAX_MESSAGE_CHARS, clip
from predictor.protocols.errors import InvalidRequest, ServingError, internal_message, public_message

REPOSITORY_PREFIX = "/v2/repository/"


def _message(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return clip(str(reason if isinstance(reason, str) else exc), MAX_MESSAGE_CHARS)


def _answer(status: int, message: str) -> ORJSONResponse:
    return ORJSONResponse({"error": message}, status_code=status)


async def client_error(_: Request, exc: Exception) -> ORJSONResponse:
    return _answer(exc.status if isinstance(exc, InvalidRequest) else 400, _message(exc))


async def validation_error(_: Request, exc: Exception) -> ORJSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ())) or "body"
    return _answer(422, clip(f"{where}: {first.get('msg', 'invalid')}", MAX_MESSAGE_CHARS))


async def not_found(_: Request, exc: Exception) -> ORJSONResponse:
    return _answer(404, _message(exc))


async def unavailable(_: Request, exc: Exception) -> ORJSONResponse:
    return _answer(503, _message(exc))


async def not_implemented(_: Request, exc: Exception) -> ORJSONResponse:
    return _answer(501, _message(exc))


async def internal(_: Request, exc: Exception) -> ORJSONResponse:
    return _answer(500, internal_message(exc))


class FerryRESTServer(RESTServer):
    """KServe's RESTServer; its start-up (app, middlewares, routes, uvicorn) is KServe's own.
    (Its model repository routes are kept from clients by ferry's front unless enabled.)"""

    def _add_exception_handlers(self, app: fastapi.FastAPI) -> None:
        super()._add_exception_handlers(app)
        handlers: list[tuple[type[Exception], Any]] = [
            (InvalidInput, client_error),
            (UnsupportedProtocol, client_error),
            (RequestValidationError, validation_error),
            (ModelNotFound, not_found),
            (ModelNotReady, unavailable),
            (ServerNotLive, unavailable),
            (ServerNotReady, unavailable),
            (NotImplementedError, not_implemented),
            (InferenceError, internal),
            (Exception, internal),
        ]
        for kind, handler in handlers:
            app.add_exception_handler(kind, handler)


class ErrorInterceptor(AsyncExceptionToStatusInterceptor):
    """gRPC statuses from the same rules (replaces KServe's ExceptionToStatusInterceptor)."""

    async def handle_exception(self, ex: Exception, request_or_iterator: Any, context: Any, method_name: str) -> Any:
        if isinstance(ex, InvalidInput | UnsupportedProtocol):
            await context.abort(StatusCode.INVALID_ARGUMENT, _message(ex))
        elif isinstance(ex, ServingError):
            await context.abort(ex.status_code, public_message(ex))
        elif isinstance(ex, ModelNotFound):
            await context.abort(StatusCode.NOT_FOUND, _message(ex))
        elif isinstance(ex, ModelNotReady | ServerNotLive | ServerNotReady):
            await context.abort(StatusCode.UNAVAILABLE, _message(ex))
        elif isinstance(ex, NotImplementedError):
            await context.abort(StatusCode.UNIMPLEMENTED, _message(ex))
        elif isinstance(ex, GrpcException):
            await super().handle_exception(ex, request_or_iterator, context, method_name)
        else:
            await context.abort(StatusCode.INTERNAL, internal_message(ex))
        raise ex


class FerryServicer(InferenceServicer):
    """KServe's servicer; ModelInfer decodes the request as a client error when it cannot."""

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        headers = to_headers(context)
        self.validate_grpc_request(request)
        try:
            infer_request = InferRequest.from_grpc(request)
        except InvalidInput:
            raise
        except Exception as exc:
            raise InvalidRequest(
                "request", "is not a valid inference request (its inputs, shapes or contents do not agree)"
            ) from exc
        response_body, _ = await self._data_plane.infer(
            request=infer_request, headers=headers, model_name=request.model_name
        )
        if isinstance(response_body, pb.ModelInferResponse):
            return response_body
        if isinstance(response_body, InferResponse):
            return response_body.to_grpc()
        return pb.ModelInferResponse(
            id=response_body["id"], model_name=response_body["model_name"], outputs=response_body["outputs"]
        )
