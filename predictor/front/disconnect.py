"""Learning that a client went away without a task per request waiting on `receive()`.

uvicorn marks a request's cycle `disconnected` in `connection_lost`; ferry's patch then calls
the callback a request registered on its cycle. Servers without that cycle (other ASGI
servers, test transports) fall back to one watcher task per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.types import Receive

HOOK = "ferry_on_disconnect"
_installed = False


def install() -> None:
    """Wraps uvicorn's protocols' `connection_lost` once per process."""
    global _installed
    if _installed:
        return
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for protocol in (h11_impl.H11Protocol, httptools_impl.HttpToolsProtocol):
        original = protocol.connection_lost

        def connection_lost(self: Any, exc: Exception | None, _original: Any = original) -> None:
            cycle = self.cycle
            _original(self, exc)
            hook = getattr(cycle, HOOK, None) if cycle is not None else None
            if hook is not None and cycle.disconnected:
                hook()

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
    _installed = True


class Watch:
    """Calls `on_disconnect` once if the client goes away before `stop()`."""

    def __init__(self, receive: Receive, on_disconnect: Callable[[], None]) -> None:
        self._cycle = getattr(receive, "__self__", None)
        self._task: asyncio.Task[None] | None = None
        if _installed and self._cycle is not None and hasattr(self._cycle, "disconnected"):
            setattr(self._cycle, HOOK, on_disconnect)
        else:
            self._cycle = None
            self._task = asyncio.ensure_future(self._watch(receive, on_disconnect))

    @staticmethod
    async def _watch(receive: Receive, on_disconnect: Callable[[], None]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        on_disconnect()

    def stop(self) -> None:
        if self._cycle is not None:
            setattr(self._cycle, HOOK, None)
        elif self._task is not None:
            self._task.cancel()
