"""The engine thread's side of a batch: collects what a step produced and hands it to the
event loop in one call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from predictor.engine import EngineOutput

if TYPE_CHECKING:
    from predictor.batcher.stream import RequestStream


class BatchListener:
    """Runs in the engine thread: collects a step's deltas and answers, and hands them to the
    event loop in one call per step (per batch when no sequence needs per-token work)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[tuple[RequestStream, str | EngineOutput]]], None],
        tickets: Sequence[RequestStream],
        inter_token: Any = None,
    ) -> None:
        self.loop = loop
        self.deliver = deliver
        self.tickets = tickets
        self.pending: list[tuple[RequestStream, str | EngineOutput]] = []
        self.inter_token = inter_token  # histogram of the gap between two decoding steps
        self._stepped = False  # a per-step engine reported a token since the last flush
        self._last_step_at: float | None = None

    def on_token(self, index: int, delta: str) -> bool:
        self._stepped = True
        ticket = self.tickets[index]
        if ticket.cancelled:
            return True
        if ticket.first_token_at is None:
            ticket.first_token_at = time.monotonic()
        if delta and ticket.request.incremental:
            self.pending.append((ticket, delta))
        return False

    def on_done(self, index: int, output: EngineOutput) -> None:
        self.pending.append((self.tickets[index], output))

    def cancelled(self, index: int) -> bool:
        self._stepped = True
        return self.tickets[index].cancelled

    def flush(self) -> None:
        if self._stepped:  # the end of a decoding step (not of a call without per-step work)
            self._stepped = False
            now = time.monotonic()
            if self._last_step_at is not None and self.inter_token is not None:
                self.inter_token.observe(now - self._last_step_at)
            self._last_step_at = now
        if self.pending:
            pending, self.pending = self.pending, []
            self.loop.call_soon_threadsafe(self.deliver, pending)

    def take(self) -> list[tuple[RequestStream, str | EngineOutput]]:
        pending, self.pending = self.pending, []
        return pending
