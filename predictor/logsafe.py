"""Client-supplied text in answers and logs: bounded, and never able to start a log line.

`clip` bounds a string a client chose (a model name, a field name, a value) before it goes into
an error message. `SafeLogFilter`, on every handler of ferry's, KServe's and uvicorn's loggers,
escapes control characters (a `%0a` in a model name cannot forge a log line) and truncates each
message; tracebacks (ferry logs them only for its own failures) are left as they are.
"""

from __future__ import annotations

import logging

MAX_ECHO_CHARS = 200  # of one client-supplied value inside an error message
MAX_MESSAGE_CHARS = 1000  # of an error message sent to a client
MAX_LOG_CHARS = 2000  # of one log message

_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t", 127: "\\x7f"}
_ESCAPES |= {0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\x85"}


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def escape(text: str) -> str:
    """Control characters (newlines included) as visible escapes."""
    return text.translate(_ESCAPES) if not text.isprintable() else text


def for_log(text: str, limit: int = MAX_LOG_CHARS) -> str:
    return clip(escape(text), limit)


class SafeLogFilter(logging.Filter):
    """Formats the record's message once, escaped and truncated (idempotent per record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_ferry_safe", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it itself
            return True
        safe = for_log(message)
        if safe != message or record.args:
            record.msg = safe
            record.args = None
        record._ferry_safe = True
        return True


LOGGERS = ("ferry", "kserve", "kserve.trace", "uvicorn", "uvicorn.error", "")


def install(loggers: tuple[str, ...] = LOGGERS) -> None:
    """Puts the filter first on every handler of these loggers (not uvicorn.access: its
    formatter reads the record's args, and it quotes the path itself)."""
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, SafeLogFilter) for f in handler.filters):
                handler.filters.insert(0, SafeLogFilter())
