"""uvicorn's httptools protocol with the limits a server on a network needs, enforced before the
app sees a request:

- request line + headers: at most `max_header_bytes` and `max_header_count` headers, else 431;
- a request's headers must arrive within `header_timeout_s` (from the connection's start or the
  request's first byte) and its body within `body_timeout_s` after them, else 408 and the
  connection is closed (idle keep-alive connections close after KServe's
  `--timeout_keep_alive`);
- health probes and /metrics are served even when the connection cap (`max_connections`) is
  full, and at the cap idle keep-alive connections are closed to make room;
- at shutdown every new request is answered 503 + Retry-After until the process exits, and
  connections still sending a request are cut (`cut_stalled`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger("ferry.front")
LINGER_S = 0.5


@dataclass
class GuardConfig:
    max_header_bytes: int
    max_header_count: int
    header_timeout_s: float
    body_timeout_s: float
    retry_after_s: int
    probe_paths: frozenset[bytes] = frozenset()  # served past the connection cap
    closing: bool = False  # shutdown: every new request is answered 503
    cut: dict[str, int] = field(default_factory=dict)  # connections cut, by reason (tests, logs)
    # Connections with a deadline, checked by one sweeper timer: arming a deadline per request
    # is then two assignments, not a timer scheduled and cancelled (measured on the hot path).
    watched: dict[GuardedProtocol, None] = field(default_factory=dict)
    sweeper: asyncio.TimerHandle | None = None
    # The hot routes' direct path (predictor.front.direct): a request's coroutine, or None
    # for the ASGI path.
    direct: Callable[[RequestResponseCycle], Coroutine[Any, Any, None] | None] | None = None

    def count(self, reason: str) -> None:
        self.cut[reason] = self.cut.get(reason, 0) + 1

    @property
    def sweep_interval_s(self) -> float:
        """A tenth of the shortest timeout (so a timeout is enforced within 10 % of itself)."""
        return min(max(min(self.header_timeout_s, self.body_timeout_s) / 10, 0.02), 1.0)

    def watch(self, connection: GuardedProtocol) -> None:
        self.watched[connection] = None
        if self.sweeper is None:
            self.sweeper = connection.loop.call_later(self.sweep_interval_s, self._sweep, connection.loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sweeper = None
        now = loop.time()
        for connection in list(self.watched):
            deadline = connection._deadline
            if deadline is None or now >= deadline:
                del self.watched[connection]
                if deadline is not None:
                    connection._deadline = None
                    connection._timed_out(connection._deadline_reason)
        if self.watched:
            self.sweeper = loop.call_later(self.sweep_interval_s, self._sweep, loop)


def _response(status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    body = orjson.dumps({"error": message})
    head = [STATUS_LINE[status], b"content-type: application/json\r\n"]
    for name, value in extra or ():
        head.append(name + b": " + value + b"\r\n")
    head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    return b"".join(head) + body


class GuardedProtocol(HttpToolsProtocol):
    GUARD: GuardConfig  # set on the subclass `protocol_class` makes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True  # waiting for (or reading) a request's line and headers
        self._in_body = False
        self._started = False  # a byte of the current request has arrived
        self._rejected = False
        self._head_bytes = 0
        self._header_count = 0
        self._head_fed = 0  # bytes received while in the head: bounds httptools' buffering
        self._deadline: float | None = None  # loop time by which the current phase must end
        self._deadline_reason = ""
        self._arm(self.GUARD.header_timeout_s, "header_timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ---- timers --------------------------------------------------------------------------

    def _arm(self, seconds: float, reason: str) -> None:
        self._deadline = self.loop.time() + seconds
        self._deadline_reason = reason
        self.GUARD.watch(self)

    def _disarm(self) -> None:
        self._deadline = None  # the sweeper forgets the connection on its next pass

    def _timed_out(self, reason: str) -> None:
        if reason == "keep_alive":  # idle between requests for --timeout_keep_alive
            if not self._started and not self.transport.is_closing():
                self.transport.close()
            return
        if reason == "header_timeout" and self._in_head:
            if not self._started:  # not a byte of a request: nothing to answer, just close
                self.GUARD.count("idle_timeout")
                self._rejected = True
                self.transport.close()
                return
            what = f"request headers not received within {self.GUARD.header_timeout_s:g} s"
        elif reason == "body_timeout" and self._in_body:
            what = f"request body not received within {self.GUARD.body_timeout_s:g} s"
        else:
            return
        self._reject(408, what, reason)

    def _reject(self, status: int, message: str, reason: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answers `status` unless a response has started, then closes the connection; the
        app (if it is reading this request's body) sees a disconnect."""
        if self._rejected:
            return
        self._rejected = True
        self._disarm()
        self.GUARD.count(reason)
        log.debug("closing a connection from %s: %s", self.client, message)
        cycle = self.cycle
        transport = self.transport
        if transport.is_closing():
            return
        if cycle is None or cycle.response_complete or not cycle.response_started:
            transport.write(_response(status, message, extra))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if transport.can_write_eof():
            # A lingering close: the answer goes out with a FIN and what the client still sends
            # is read and dropped for a moment, so that closing does not reset the connection
            # (and the answer with it) while the client is mid-send.
            transport.write_eof()
            self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    # ---- parsing -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        in_head = self._in_head
        super().data_received(data)
        if in_head and self._in_head and not self._rejected:
            # Still in the head after this read: httptools buffers a header it has not finished,
            # so the bytes of an unfinished head are bounded here, one read at a time.
            self._head_fed += len(data)
            if self._head_fed > self.GUARD.max_header_bytes:
                self._too_large(f"request headers over {self.GUARD.max_header_bytes} bytes")

    def _too_large(self, message: str) -> None:
        self._reject(431, message, "headers_too_large")

    def on_message_begin(self) -> None:
        if self._rejected:
            return
        super().on_message_begin()
        self._in_head = True
        self._started = True
        self._head_bytes = 0
        self._header_count = 0
        if self._deadline is None or self._deadline_reason == "keep_alive":  # the next request starts now
            self._arm(self.GUARD.header_timeout_s, "header_timeout")

    def on_url(self, url: bytes) -> None:
        if self._rejected:
            return
        self._head_bytes += len(url)
        if self._head_bytes > self.GUARD.max_header_bytes:
            self._too_large(f"request line over {self.GUARD.max_header_bytes} bytes")
            return
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._rejected:
            return
        self._header_count += 1
        self._head_bytes += len(name) + len(value) + 4
        if self._header_count > self.GUARD.max_header_count:
            self._too_large(f"more than {self.GUARD.max_header_count} request headers")
            return
        if self._head_bytes > self.GUARD.max_header_bytes:
            self._too_large(f"request headers over {self.GUARD.max_header_bytes} bytes")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._rejected:
            return
        self._in_head = False
        self._head_fed = 0
        guard = self.GUARD
        if guard.closing:
            if self.access_log:  # an answer like any other in the access log
                client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
                method, version = self.parser.get_method().decode(), self.parser.get_http_version()
                path = self.url.decode("latin-1")
                self.access_logger.info('%s - "%s %s HTTP/%s" %d', client, method, path, version, 503)
            retry = str(guard.retry_after_s).encode()
            self._reject(503, "server is shutting down", "shutdown", [(b"retry-after", retry)])
            return
        self._in_body = True
        self._arm(guard.body_timeout_s, "body_timeout")
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            if self.url.split(b"?", 1)[0] in guard.probe_paths:
                # Probes and scrapes are answered past the cap: a full cap of stalled or busy
                # clients must not fail liveness (a restart would not help) or readiness.
                self.limit_concurrency = None
                try:
                    super().on_headers_complete()
                finally:
                    self.limit_concurrency = limit
                return
            _close_idle(self.connections, self)
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        """uvicorn's, with the keep-alive timeout on the guard's sweeper instead of a timer
        scheduled and cancelled per request."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif not self._started:  # no next request begun yet
            self._arm(self.timeout_keep_alive, "keep_alive")

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        direct = self.GUARD.direct
        serve = direct(cycle) if direct is not None and app is self.app else None
        if serve is None:
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(serve)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def on_body(self, body: bytes) -> None:
        if self._rejected or self.cycle is None:
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._rejected or self.cycle is None:
            return
        self._in_body = False
        self._started = False
        self._disarm()
        super().on_message_complete()

    # ---- shutdown ------------------------------------------------------------------------

    def cut_stalled(self) -> None:
        """Shutdown: a connection still sending its request is answered 503 and closed; one
        between requests is closed; one whose request is being served is left to finish; a new
        one that has sent nothing yet is left to send it (answered 503 at its headers, within
        the header timeout): closing it would reach its client as a dropped request."""
        if self._rejected or self.transport is None or self.transport.is_closing():
            return
        cycle = self.cycle
        if self._in_body or (self._in_head and self._started):
            retry = str(self.GUARD.retry_after_s).encode()
            self._reject(503, "server is shutting down", "shutdown", [(b"retry-after", retry)])
        elif cycle is not None and cycle.response_complete:  # between requests
            self._disarm()
            self.transport.close()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown closes a connection with no request in progress; a new
        one that has sent nothing yet is kept, as in `cut_stalled`, while ferry answers 503."""
        if self.GUARD.closing and self.cycle is None and not self._in_head and not self._rejected:
            return
        super().shutdown()


def _close_idle(connections: Any, keep: Any) -> None:
    """At the connection cap: close keep-alive connections that are between requests, so the
    cap holds clients with work rather than idle sockets."""
    for connection in list(connections):
        if connection is keep or not isinstance(connection, GuardedProtocol):
            continue
        cycle = connection.cycle
        if (
            cycle is not None
            and cycle.response_complete
            and not connection._in_head
            and not connection._in_body
            and not connection.transport.is_closing()
        ):
            connection._disarm()
            connection._unset_keepalive_if_required()
            connection.transport.close()


def protocol_class(guard: GuardConfig) -> type[GuardedProtocol]:
    """uvicorn's `http` protocol class for one server, bound to its limits."""
    return type("FerryHttpProtocol", (GuardedProtocol,), {"GUARD": guard})


def cut_stalled(server_state: Any) -> int:
    """Shutdown: `cut_stalled` on every connection; returns how many were open."""
    connections = list(server_state.connections)
    for connection in connections:
        if isinstance(connection, GuardedProtocol):
            connection.cut_stalled()
    return len(connections)
