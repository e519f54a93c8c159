"""A lane: one queue and the engine slots that serve it.

The interactive lane takes every request by default. When the engine has a background lane
(CPU: generators whose threads run at nice 10), long generations that need no per-token work
go there: they use the cycles the interactive lane leaves, and the kernel gives the cores to a
short batch as soon as one runs, so a 100-token batch never holds a 10-token one hostage, and
no cycle is left idle (a slot kept free for short work would idle whenever none came).
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from predictor.batcher.gather import GatherPolicy
from predictor.engine import Sampling

if TYPE_CHECKING:
    from predictor.batcher.stream import RequestStream


def settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Lane:
    def __init__(self, name: str, slots: int, *, background: bool, max_batch_size: int, max_wait_s: float) -> None:
        self.name = name
        self.slots = slots
        self.background = background
        self.max_batch_size = max_batch_size
        self.queue: collections.deque[RequestStream] = collections.deque()
        self.busy = 0  # slots running a call
        self.running_requests = 0  # requests in those calls
        self.in_flight = 0  # admitted to this lane and not answered
        self.policy = GatherPolicy(max_wait_s, max_batch_size, slots)
        self.wake = asyncio.Event()  # a slot freed or a request arrived
        self._enough: asyncio.Future[None] | None = None  # set when the queue reaches the target
        self._gather_target = max_batch_size + 1  # no gathering in progress

    @property
    def free_slots(self) -> int:
        return self.slots - self.busy

    def admit(self, ticket: RequestStream) -> None:
        self.queue.append(ticket)
        self.in_flight += 1
        self.policy.observe_in_flight(self.in_flight)
        if self.busy < self.slots:
            self.wake.set()
        if len(self.queue) >= self._gather_target and self._enough is not None:
            settle(self._enough)

    async def gather(self, target: int, window_s: float) -> None:
        """Waits at most window_s for the queue to reach target (see GatherPolicy)."""
        loop = asyncio.get_running_loop()
        self._gather_target = target
        self._enough = enough = loop.create_future()
        timer = loop.call_later(window_s, settle, enough)
        try:
            await enough
        finally:
            timer.cancel()
            self._gather_target = self.max_batch_size + 1
            self._enough = None

    def take_batch(self, limit: int | None = None) -> list[RequestStream]:
        """Up to `limit` (max_batch_size) live requests of the head's group: the same sampling
        settings, the same EOS handling (CTranslate2 takes both per call), and either all new or
        all continuing a chunked decode (a continuation's prompt holds what it generated so far;
        new prompts padded to it would cost its length)."""
        limit = min(limit or self.max_batch_size, self.max_batch_size)
        head: tuple[Sampling, bool, bool] | None = None
        taken: list[RequestStream] = []
        kept: collections.deque[RequestStream] = collections.deque()
        while self.queue:
            ticket = self.queue.popleft()
            if ticket.cancelled or ticket.done:
                continue
            group = (ticket.request.sampling, bool(ticket.item.generated), ticket.request.ignore_eos)
            if head is None:
                head = group
            if len(taken) < limit and group == head:
                taken.append(ticket)
                if len(taken) == limit and not kept:
                    break  # common case: no need to scan the rest
            else:
                kept.append(ticket)
        kept.extend(self.queue)
        self.queue = kept
        return taken
