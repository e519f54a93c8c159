"""Which request a piece of work belongs to: `X-Request-Id` (read or generated) and W3C
`traceparent`, held in context variables for the task that serves the request, so that every
log line written while serving it carries them (`RequestContextFilter` puts them on records;
`RequestTagFormatter` writes them in text logs, python-json-logger in JSON ones).

The HTTP front sets them per request (and returns `X-Request-Id` on every answer, errors and
event streams alike); the gRPC interceptor does the same from metadata.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Iterable
from contextvars import ContextVar, Token
from typing import Any

REQUEST_ID_HEADER = b"x-request-id"
TRACEPARENT_HEADER = b"traceparent"

_request_id: ContextVar[str | None] = ContextVar("ferry_request_id", default=None)
_traceparent: ContextVar[str | None] = ContextVar("ferry_traceparent", default=None)

# What a client may send as its id: printable, no spaces, bounded (it is echoed and logged).
_VALID_ID = re.compile(r"[A-Za-z0-9._~:/+=@-]{1,128}")
# W3C trace context: version-traceid-parentid-flags.
_VALID_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


# Generated ids: 16 random hex digits per process, then a counter (32 hex digits in all):
# unique across pods and restarts, and cheaper than a uuid4 (no system call per request).
_PROCESS_PREFIX = os.urandom(8).hex()
_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_PROCESS_PREFIX}{next(_counter):016x}"


def accept_request_id(value: str | bytes | None) -> str:
    """The client's id when it is usable, else a new one."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value and _VALID_ID.fullmatch(value):
        return value
    return new_request_id()


def accept_traceparent(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value and _VALID_TRACEPARENT.fullmatch(value.strip().lower()):
        return value.strip().lower()
    return None


def ids_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, str | None]:
    """The request id (the client's X-Request-Id when usable, else a new one) and traceparent."""
    request_id = traceparent = None
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            request_id = value
        elif name == TRACEPARENT_HEADER:
            traceparent = value
    return accept_request_id(request_id), accept_traceparent(traceparent)


def bind(request_id: str, traceparent: str | None = None) -> tuple[Token[str | None], Token[str | None]]:
    return _request_id.set(request_id), _traceparent.set(traceparent)


def unbind(tokens: tuple[Token[str | None], Token[str | None]]) -> None:
    _request_id.reset(tokens[0])
    _traceparent.reset(tokens[1])


def current_request_id() -> str | None:
    return _request_id.get()


def current_traceparent() -> str | None:
    return _traceparent.get()


def id_suffix() -> str:
    """The current request's id (OpenAI ids end with it), or a new one outside a request."""
    return _request_id.get() or new_request_id()


class RequestContextFilter(logging.Filter):
    """Adds `request_id` and `traceparent` to every record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.__dict__.get("request_id") is None:
            record.__dict__["request_id"] = _request_id.get()
            record.__dict__["traceparent"] = _traceparent.get()
        return True


class RequestTagFormatter(logging.Formatter):
    """Text logs: a handler's own formatter, then `[request_id=... traceparent=...]` at the end
    of the first line of a record written while serving a request (whatever the formatter does
    with the message: uvicorn's access lines are built from their arguments alone)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        request_id = record.__dict__.get("request_id")
        if request_id is None:
            return text
        traceparent = record.__dict__.get("traceparent")
        tag = f" [request_id={request_id}" + (f" traceparent={traceparent}]" if traceparent else "]")
        first, newline, rest = text.partition("\n")
        return first + tag + newline + rest


def json_formatter() -> logging.Formatter:
    """python-json-logger's formatter: one JSON object per line, with the request fields."""
    try:
        from pythonjsonlogger.json import JsonFormatter
    except ImportError:  # python-json-logger < 3.1
        from pythonjsonlogger.jsonlogger import JsonFormatter

    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(traceparent)s",
        rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
    )


def configure_logging(log_format: str, loggers: tuple[str, ...] = ("ferry", "kserve", "uvicorn")) -> None:
    """Installs the filter (and, for json, the formatter) on the handlers of ferry's, KServe's
    and uvicorn's loggers and on the root logger's."""
    seen: set[int] = set()
    handlers: list[logging.Handler] = []
    for name in (*loggers, "uvicorn.access", "uvicorn.error", "kserve.trace", ""):
        for handler in logging.getLogger(name).handlers:
            if id(handler) not in seen:
                seen.add(id(handler))
                handlers.append(handler)
    formatter: Any = json_formatter() if log_format == "json" else None
    for handler in handlers:
        if not any(isinstance(f, RequestContextFilter) for f in handler.filters):
            handler.addFilter(RequestContextFilter())
        if formatter is not None:
            handler.setFormatter(formatter)
        elif not isinstance(handler.formatter, RequestTagFormatter):
            handler.setFormatter(RequestTagFormatter(handler.formatter))
