"""The front ASGI app: ferry's hot routes served directly, the rest handed to FastAPI."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from predictor import request_context
from predictor.auth import ApiKey
from predictor.front.disconnect import Watch, install
from predictor.protocols.errors import InvalidRequest, failure_of, public_message

log = logging.getLogger("ferry.front")

Handler = Callable[[bytes], Awaitable[Any]]  # a dict (JSON answer) or an async iterable of SSE chunks
ErrorBody = Callable[[BaseException], tuple[int, dict[str, Any]]]
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def plain_error(error: BaseException) -> tuple[int, dict[str, Any]]:
    """{"error": message} with the status from the failure table (KServe's REST shape)."""
    if isinstance(error, InvalidRequest):
        return error.status, {"error": str(error)}
    return failure_of(error).http_status, {"error": public_message(error)}


@dataclass(frozen=True)
class Route:
    handle: Handler
    error_body: ErrorBody = plain_error
    protocol: str | None = None  # counted here (streams outlive the handler); None: by the handler
    observe: Callable[[str], Any] | None = None
    direct: bool = False  # answers are always JSON: may be served on uvicorn's cycle (direct.py)

    def error_answer(self, error: Exception) -> tuple[int, Any, bool]:
        """The status, body and whether to send Retry-After, for a failed request."""
        status, payload = self.error_body(error)
        return status, payload, failure_of(error).retry_after


class BodyTooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"body: {size} bytes is over the limit of {limit} bytes")


class _ClientGone(asyncio.CancelledError):
    """The client went away while its body was being read."""


class Front:
    def __init__(
        self,
        fallback: ASGIApp,
        routes: dict[tuple[str, str], Route],
        *,
        max_body_bytes: int,
        retry_after_s: int,
        api_key: ApiKey | None = None,
        blocked_prefixes: tuple[str, ...] = (),
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
        install()
        self.fallback = fallback
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.retry_after = str(retry_after_s).encode()
        self.api_key = api_key  # None: no key configured
        self.blocked_prefixes = blocked_prefixes  # routes not served (KServe's model repository)
        self.before_scrape = before_scrape  # records what waits to be recorded (see Batcher)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        # X-Request-Id (the client's or a new one) on every answer; it and traceparent are on
        # every log line written while this request is served.
        request_id, traceparent = request_context.ids_from_headers(scope["headers"])
        bound = request_context.bind(request_id, traceparent)
        try:
            await self._http(scope, receive, _with_request_id(send, request_id))
        finally:
            request_context.unbind(bound)

    def unauthorized(self, scope: Scope) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
        """The 401's headers and body when an API key is configured and not presented; one
        check for every route, hot, direct and fallback."""
        if self.api_key is None:
            return None
        problem = self.api_key.http_problem(scope["method"], scope["path"], scope["headers"])
        return None if problem is None else self.api_key.http_401(scope["path"], problem)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self.unauthorized(scope)
        if refused is not None:
            headers, body = refused
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if self.blocked_prefixes and scope["path"].startswith(self.blocked_prefixes):
            await self._send_json(send, 404, {"error": "not served: the model repository routes are disabled"})
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._send_json(send, 413, {"error": str(BodyTooLarge(declared, self.max_body_bytes))})
            return
        route = self.routes.get((scope["method"], scope["path"]))
        if route is None and self.before_scrape is not None and scope["path"] == "/metrics":
            self.before_scrape()
        task = asyncio.current_task()
        assert task is not None
        gone = False

        def on_disconnect() -> None:
            nonlocal gone
            gone = True
            task.cancel()

        watch = Watch(receive, on_disconnect)
        try:
            if route is None:
                await self._fallback(scope, receive, send)
            else:
                await self._serve(route, receive, send)
        except asyncio.CancelledError as exc:
            if gone:
                task.uncancel()
            elif not isinstance(exc, _ClientGone):
                raise  # cancelled from outside (shutdown), not by a disconnect
        finally:
            watch.stop()

    async def _fallback(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _chunked(scope):
            # No declared length: read the body here, so that one over the limit is a 413
            # whichever app would have read it (FastAPI turns a failed read into a 400).
            try:
                body = await self._read_body(receive)
            except InvalidRequest as exc:
                await self._send_json(send, exc.status, {"error": str(exc)})
                return
            receive = _replay(body, receive)
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge(received, self.max_body_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.fallback(scope, limited_receive, tracked_send)
        except BodyTooLarge as exc:
            if not started:
                await self._send_json(send, 413, {"error": str(exc)})
        except Exception:
            if not started:
                raise
            # Starlette answered it (ferry's 500 handler logged it once, with an error id) and
            # re-raised it for the server to log again: it is handled.

    async def _serve(self, route: Route, receive: Receive, send: Send) -> None:
        observed = route.observe(route.protocol) if route.observe and route.protocol else None
        error: BaseException | None = None
        try:
            body = await self._read_body(receive)
            answer = await route.handle(body)
            if isinstance(answer, dict):
                await self._send_json(_coalescing(receive, send), 200, answer)
            else:
                await self._send_events(send, answer)
                error = getattr(answer, "error", None)
        except asyncio.CancelledError as exc:
            error = exc
            raise
        except Exception as exc:
            error = exc
            status, payload, retry = route.error_answer(exc)
            await self._send_json(send, status, payload, retry_after=retry)
        finally:
            if observed is not None:
                observed.record(error)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                limit = self.max_body_bytes
                raise InvalidRequest("body", f"{size} bytes is over the limit of {limit} bytes", status=413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _send_json(self, send: Send, status: int, payload: Any, *, retry_after: bool = False) -> None:
        body = orjson.dumps(payload)
        headers = [*JSON, (b"content-length", str(len(body)).encode())]
        if retry_after:
            headers.append((b"retry-after", self.retry_after))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _send_events(send: Send, chunks: AsyncIterable[bytes]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Collect:
    """Stands in for uvicorn's transport while one response is sent, so that its status line,
    headers and body leave in one write (one syscall instead of two, measured to matter at
    GPU-class rates)."""

    __slots__ = ("closed", "parts")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _coalescing(receive: Receive, send: Send) -> Send:
    """`send` for a response whose body is one message: on uvicorn, what it writes for the start
    and the body goes out in one write; elsewhere `send` itself."""
    cycle = getattr(receive, "__self__", None)
    if cycle is None or not hasattr(cycle, "transport") or not hasattr(cycle, "response_complete"):
        return send

    async def coalesced(message: Message) -> None:
        if message["type"] == "http.response.start":
            if not isinstance(cycle.transport, _Collect):
                real = cycle.transport
                cycle.transport = _Collect()
                cycle.ferry_real_transport = real
            await send(message)
            return
        collected = cycle.transport
        real = getattr(cycle, "ferry_real_transport", None)
        if not isinstance(collected, _Collect) or real is None:
            await send(message)
            return
        try:
            await send(message)
        finally:
            cycle.transport = real
        real.write(b"".join(collected.parts))
        if collected.closed:
            real.close()

    return coalesced


def _with_request_id(send: Send, request_id: str) -> Send:
    header = (request_context.REQUEST_ID_HEADER, request_id.encode("latin-1"))

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return send_with_id


def _chunked(scope: Scope) -> bool:
    return any(name == b"transfer-encoding" for name, _ in scope["headers"])


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` that hands over a body already read, then goes on to the real one."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
