"""Hot routes answered straight on uvicorn's request cycle, with no ASGI messages in between.

Through ASGI a hot request costs a dozen awaits, message dicts and header checks between
uvicorn's protocol and ferry's handler, and its answer two `send` calls; at GPU-class rates
that was about a fifth of the event loop's time per request (docs/performance.md). For a hot
route whose body has a declared length, the connection's task runs ferry's handler itself and
writes the whole answer (status line, headers, body) with one `transport.write`, then tells
the cycle it is complete, so keep-alive, pipelining, flow control, the guard's timeouts and
graceful shutdown work as they do for every other request. The answers are the ASGI path's:
same statuses, headers and bodies. Everything else (chunked bodies, `Expect: 100-continue`,
the other routes, access logging on) takes the ASGI path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from predictor import request_context
from predictor.front.disconnect import HOOK

if TYPE_CHECKING:
    from predictor.front.app import Front, Route

log = logging.getLogger("ferry.front")
JSON_TYPE = b"content-type: application/json\r\n"


class _ClientGone(Exception):
    """The client went away before its body arrived."""


def direct_task(front: Front, cycle: RequestResponseCycle) -> Coroutine[Any, Any, None] | None:
    """The coroutine that serves this request directly, or None for the ASGI path."""
    scope = cycle.scope
    route = front.routes.get((scope["method"], scope["path"]))
    if route is None or not route.direct or cycle.waiting_for_100_continue:
        return None
    declared = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            declared = int(value) if value.isdigit() else None
        elif name == b"transfer-encoding":
            return None
    if declared is None or declared > front.max_body_bytes:
        return None  # the ASGI path reads it with its limit (and answers 413)
    return serve(front, route, cycle)


async def serve(front: Front, route: Route, cycle: RequestResponseCycle) -> None:
    scope: Any = cycle.scope  # uvicorn's HTTPScope, read as the ASGI scope it is
    request_id, traceparent = request_context.ids_from_headers(scope["headers"])
    request_context.bind(request_id, traceparent)  # this task's own context: nothing to unbind
    id_header = b"x-request-id: " + request_id.encode("latin-1") + b"\r\n"
    try:
        refused = front.unauthorized(scope)
        if refused is not None:
            headers, body = refused
            head = b"".join(name + b": " + value + b"\r\n" for name, value in headers if name != b"content-length")
            _write(cycle, 401, head + id_header, body)
            return
        await _answer(front, route, cycle, id_header)
    except BaseException as exc:  # a bug here must not leave the connection hanging
        if not isinstance(exc, asyncio.CancelledError):
            log.error("Exception in ASGI application", exc_info=exc)
        if not cycle.response_started and not cycle.disconnected:
            _write(cycle, 500, b"content-type: text/plain; charset=utf-8\r\n", b"Internal Server Error", close=True)
        elif not cycle.response_complete:
            cycle.transport.close()
        if not isinstance(exc, Exception):
            raise


async def _answer(front: Front, route: Route, cycle: RequestResponseCycle, id_header: bytes) -> None:
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def on_disconnect() -> None:  # see predictor.front.disconnect
        nonlocal gone
        gone = True
        task.cancel()

    setattr(cycle, HOOK, on_disconnect)
    retry = False
    try:
        try:
            payload = await route.handle(await _body(cycle))
            status = 200
        except (asyncio.CancelledError, _ClientGone):
            if gone:
                task.uncancel()
            if gone or cycle.disconnected:
                return  # nobody to answer
            raise  # cancelled from outside (shutdown)
        except Exception as exc:
            status, payload, retry = route.error_answer(exc)
    finally:
        setattr(cycle, HOOK, None)
    head = JSON_TYPE + id_header + (b"retry-after: " + front.retry_after + b"\r\n" if retry else b"")
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()  # a client that does not read: its answers wait, not pile up
    _write(cycle, status, head, orjson.dumps(payload))


async def _body(cycle: RequestResponseCycle) -> bytes:
    """The request body (its declared length, at most max_body_bytes: checked before)."""
    while cycle.more_body and not cycle.disconnected:
        cycle.flow.resume_reading()
        await cycle.message_event.wait()
        cycle.message_event.clear()
    if cycle.disconnected:
        raise _ClientGone()
    return bytes(cycle.body)


def _write(cycle: RequestResponseCycle, status: int, head: bytes, body: bytes, *, close: bool = False) -> None:
    """The whole answer in one write (`head`: header lines, content-length added here); then
    the cycle is complete, as after ASGI's last send."""
    if cycle.disconnected or cycle.response_started:
        return
    cycle.response_started = True
    keep_alive = cycle.keep_alive and not close
    cycle.keep_alive = keep_alive
    parts = [STATUS_LINE[status]]
    for name, value in cycle.default_headers:  # the date header, as uvicorn sends it
        parts += (name, b": ", value, b"\r\n")
    parts += (head, b"content-length: %d\r\n" % len(body))
    parts.append(b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
    parts.append(body)
    cycle.transport.write(b"".join(parts))
    cycle.response_complete = True
    cycle.message_event.set()
    if not keep_alive:
        cycle.transport.close()
    cycle.on_response()
