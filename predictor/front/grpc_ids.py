"""gRPC: `x-request-id` metadata read (or generated) and echoed as initial metadata, and bound
with `traceparent` for the call's log lines, as the HTTP front does for HTTP. The Open Inference
Protocol's own `ModelInferRequest.id` is echoed in `ModelInferResponse.id` by the V2 protocol."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from predictor import request_context


class RequestIdInterceptor(aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        request_id = request_context.accept_request_id(metadata.get("x-request-id"))
        traceparent = request_context.accept_traceparent(metadata.get("traceparent"))
        inner = handler.unary_unary

        async def with_request_id(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            bound = request_context.bind(request_id, traceparent)
            try:
                await context.send_initial_metadata((("x-request-id", request_id),))
                return await inner(request, context)
            finally:
                request_context.unbind(bound)

        return grpc.unary_unary_rpc_method_handler(
            with_request_id,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
