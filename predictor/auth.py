"""The API key: one check for every HTTP route (ferry's front) and every gRPC method (a server
interceptor), compared in constant time. Probes and Prometheus stay open.

Clients send `Authorization: Bearer <key>` (also accepted: `api-key: <key>` and
`x-api-key: <key>`, the headers OpenAI-compatible clients such as Azure's send). gRPC clients
send the `authorization: Bearer <key>` metadata. Without a key configured nothing is checked.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import orjson
from grpc import aio

from predictor.protocols.openai.schema import error_body

MISSING = "missing API key: send the header `Authorization: Bearer <key>`"
WRONG = "invalid API key"
GRPC_SERVICE = "/inference.GRPCInferenceService/"
# Probes answer without a key: Kubernetes cannot send one.
GRPC_OPEN_METHODS = frozenset(GRPC_SERVICE + m for m in ("ServerLive", "ServerReady", "ModelReady"))
GRPC_CONTROL_METHODS = frozenset(GRPC_SERVICE + m for m in ("RepositoryModelLoad", "RepositoryModelUnload"))


class ApiKey:
    """The configured key and which HTTP paths are open (health, readiness, metrics)."""

    def __init__(self, key: str, *, open_paths: Iterable[str], openai_prefix: str) -> None:
        self._key = key.strip().encode()
        self.open_paths = frozenset(open_paths)
        self.openai_prefix = openai_prefix + "/"

    def matches(self, presented: bytes) -> bool:
        return hmac.compare_digest(presented, self._key)

    # ---- HTTP ----------------------------------------------------------------------------

    def http_problem(self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """None when the request may pass; otherwise what is wrong (for the 401)."""
        if method in ("GET", "HEAD") and path in self.open_paths:
            return None
        presented = _presented(headers)
        if presented is None:
            return MISSING
        return None if self.matches(presented) else WRONG

    def http_401(self, path: str, problem: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """Headers and body of the 401, in the shape of the route's protocol."""
        if path.startswith(self.openai_prefix):
            payload: dict[str, Any] = error_body(problem, code="invalid_api_key")
        else:
            payload = {"error": problem}
        body = orjson.dumps(payload)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="ferry"'),
        ]
        return headers, body

    # ---- gRPC ----------------------------------------------------------------------------

    def grpc_problem(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        if method in GRPC_OPEN_METHODS:
            return None
        presented = None
        for name, value in metadata or ():
            if name in ("authorization", "x-api-key", "api-key"):
                raw = value if isinstance(value, bytes) else value.encode()
                presented = _bearer(raw) if name == "authorization" else raw.strip()
                break
        if presented is None:
            return "missing API key: send the metadata `authorization: Bearer <key>`"
        return None if self.matches(presented) else WRONG


def _bearer(value: bytes) -> bytes:
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _presented(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            return _bearer(value)
        if name in (b"api-key", b"x-api-key"):
            return value.strip()
    return None


def _refusal(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    async def refuse(_request: Any, context: aio.ServicerContext) -> None:
        await context.abort(code, details)

    # No deserializer: the refused request's bytes are never parsed.
    return grpc.unary_unary_rpc_method_handler(refuse)


class GuardInterceptor(aio.ServerInterceptor):
    """gRPC: the model repository methods only when enabled, and the API key when set."""

    def __init__(self, api_key: ApiKey | None, *, control_routes: bool) -> None:
        self.api_key = api_key
        self.control_routes = control_routes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if self.api_key is not None:
            problem = self.api_key.grpc_problem(method, details.invocation_metadata)
            if problem is not None:
                return _refusal(grpc.StatusCode.UNAUTHENTICATED, problem)
        if method in GRPC_CONTROL_METHODS and not self.control_routes:
            return _refusal(
                grpc.StatusCode.UNIMPLEMENTED, "model repository methods are disabled (FERRY_CONTROL_ROUTES)"
            )
        return await continuation(details)
