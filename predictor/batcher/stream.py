"""A request as its caller sees it: `GenerationRequest` in, `RequestStream` out."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from predictor import metrics, request_context
from predictor.engine import GREEDY, EngineItem, EngineOutput, Sampling
from predictor.text import TextAssembler

if TYPE_CHECKING:
    from predictor.batcher.core import Batcher
    from predictor.batcher.lanes import Lane


@dataclass(eq=False)
class GenerationRequest:
    prompt_tokens: list[str]
    max_new_tokens: int
    sampling: Sampling = GREEDY
    timeout_s: float = 30.0
    incremental: bool = False  # the caller reads text deltas as they are generated
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    ignore_eos: bool = False  # True: exactly max_new_tokens (benchmarks); False: the end token ends it

    @property
    def needs_text(self) -> bool:
        """Its text is followed token by token (deltas or stop strings): per-step engine work."""
        return self.incremental or bool(self.stop)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text of a request that asked for it (`incremental`), in order."""

    text: str


Event = TextDelta | EngineOutput


class RequestStream:
    """One admitted request as its caller sees it: text deltas (only when it asked for them),
    then the final `EngineOutput`, or an error raised from the iteration or `result()`.

    Leaving early (close, a cancelled task) abandons the request: it is never computed, or its
    sequence stops at the next step. Protocols see only this object.
    """

    def __init__(
        self, batcher: Batcher, lane: Lane, request: GenerationRequest, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.request = request
        self.lane = lane
        self._batcher = batcher
        self._loop = loop
        self.admitted_at = time.monotonic()
        self.deadline = loop.time() + request.timeout_s
        self._timer = loop.call_at(self.deadline, batcher._expire, self)
        assembler = TextAssembler(batcher.decode, request.stop) if request.needs_text else None
        self.item = EngineItem(
            request.prompt_tokens, request.max_new_tokens, [], assembler, ignore_eos=request.ignore_eos
        )
        self._deltas: collections.deque[str] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.output: EngineOutput | None = None
        self.error: BaseException | None = None
        self.cancelled = False  # read from the engine thread: stop computing this sequence
        self.running = False
        self.dispatched_at: float | None = None  # its first engine call began
        self.first_token_at: float | None = None
        self.request_id = request_context.current_request_id()  # for log lines about its batch
        self._emitted = 0  # characters of text handed out as deltas
        self._tail_sent = False
        self._final_sent = False

    # ---- the caller's side -----------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.output is not None or self.error is not None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._deltas:
                return TextDelta(self._deltas.popleft())
            if self.error is not None:
                raise self.error
            if self.output is not None:
                if not self._tail_sent:  # text the assembler held back until the end
                    self._tail_sent = True
                    tail = self.output.text[self._emitted :] if self.request.incremental else ""
                    if tail:
                        return TextDelta(tail)
                if not self._final_sent:
                    self._final_sent = True
                    return self.output
                raise StopAsyncIteration
            await self._wait()

    async def result(self) -> EngineOutput:
        """The final output (text deltas, if any, are skipped)."""
        if not self.done:
            self._waiter = waiter = self._loop.create_future()
            try:
                while not self.done:
                    await waiter
                    if not self.done:
                        self._waiter = waiter = self._loop.create_future()
            except asyncio.CancelledError:
                self.close()
                raise
            finally:
                self._waiter = None
        self._deltas.clear()
        if self.error is not None:
            raise self.error
        assert self.output is not None
        return self.output

    def close(self) -> None:
        """The caller stops reading: an unfinished request is abandoned (counted cancelled)."""
        if not self.done:
            metrics.CANCELLED.labels("running" if self.running else "queued").inc()
            self._batcher._abandon(self, asyncio.CancelledError())

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        except asyncio.CancelledError:
            self.close()
            raise
        finally:
            self._waiter = None

    # ---- the batcher's side ----------------------------------------------------------

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.item.generated)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _push(self, delta: str) -> None:
        if self.request.incremental and not self.done:
            self._deltas.append(delta)
            self._emitted += len(delta)
            self._wake()

    def _resolve(self, output: EngineOutput) -> bool:
        if self.done:
            return False
        self.output = output
        self._settle()
        return True

    def _fail(self, error: BaseException) -> bool:
        if self.done:
            return False
        self.error = error
        reason = "cancelled" if isinstance(error, asyncio.CancelledError) else "error"
        self._batcher._series.finished[reason].inc()
        self._settle()
        return True

    def _settle(self) -> None:
        self._timer.cancel()
        self._batcher._finished(self)
        self._wake()
