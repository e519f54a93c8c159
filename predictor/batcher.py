"""The batcher: one bounded queue, one consumer task, N engine slots.

Work-conserving: when a slot is free and requests wait, up to `max_batch_size` of them go to
the engine at once. There is no timer by default, so a lone request goes straight to the engine
and batches grow by themselves under load (requests pile up while the slots are busy).
`max_batch_wait_s` optionally lets a partial batch wait that long to grow.

Knows nothing of HTTP, gRPC or CTranslate2: protocols build `GenerationRequest`s, the engine
computes `EngineItem`s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from predictor import metrics
from predictor.engine import GREEDY, Engine, EngineItem, EngineOutput, Sampling

log = logging.getLogger("ferry.batcher")


class BatcherError(Exception):
    """Base of the outcomes a protocol turns into a status code."""


class QueueFull(BatcherError):
    def __init__(self, capacity: int) -> None:
        super().__init__(f"server overloaded: the request queue is full ({capacity} waiting)")


class Draining(BatcherError):
    def __init__(self) -> None:
        super().__init__("server is shutting down and accepts no new requests")


class Unavailable(BatcherError):
    def __init__(self, why: str) -> None:
        super().__init__(f"engine unavailable: {why}")


class DeadlineExceeded(BatcherError):
    def __init__(self, timeout_s: float, stage: str) -> None:
        super().__init__(f"deadline of {timeout_s:g} s passed while the request was {stage}")
        self.stage = stage


class EngineFailed(BatcherError):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"the engine failed on this request's batch: {type(cause).__name__}: {cause}")


@dataclass(eq=False)
class GenerationRequest:
    prompt_tokens: list[str]
    max_new_tokens: int
    sampling: Sampling = GREEDY
    timeout_s: float = 30.0
    stream: bool = False


@dataclass(eq=False)
class Ticket:
    """One admitted request: its future, its optional token stream, and its state."""

    request: GenerationRequest
    future: asyncio.Future[EngineOutput]
    admitted_at: float
    deadline: float
    stream: asyncio.Queue[str | None] | None = None
    cancelled: bool = False  # read from the engine thread: stop computing this sequence
    running: bool = False
    first_token_at: float | None = None
    finished: bool = False  # the caller has its answer (or error); counted out of in-flight
    enough: bool = False  # the caller stopped reading on purpose (a stop string), not a cancel


class _BatchListener:
    """Runs in the engine thread; hands results back to the event loop thread-safely."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tickets: Sequence[Ticket]) -> None:
        self.loop = loop
        self.tickets = tickets

    def on_token(self, index: int, token: str) -> bool:
        ticket = self.tickets[index]
        if ticket.cancelled:
            return True
        if ticket.first_token_at is None:
            ticket.first_token_at = time.monotonic()
        if ticket.stream is not None:
            self.loop.call_soon_threadsafe(ticket.stream.put_nowait, token)
        return False

    def on_done(self, index: int, output: EngineOutput) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.tickets[index], output)


def _resolve(ticket: Ticket, output: EngineOutput) -> None:
    if not ticket.future.done():
        ticket.future.set_result(output)
    if ticket.stream is not None:
        ticket.stream.put_nowait(None)


def _fail(ticket: Ticket, error: BaseException) -> None:
    if not ticket.future.done():
        ticket.future.set_exception(error)
        ticket.future.exception()  # mark retrieved: a cancelled waiter may never read it
    if ticket.stream is not None:
        ticket.stream.put_nowait(None)


class GatherPolicy:
    """Decides, when a slot frees, whether to wait briefly for more requests.

    Closed-loop clients send their next request as soon as their answer arrives, so a batch's
    answers come back as a burst; dispatching the burst's first arrival alone would split every
    later batch in two (1 + 39, then 20 + 20). So: `demand` is the peak number of requests in
    flight between dispatches (halved each dispatch when traffic falls); the target is demand
    minus what the other slots are running. A window opens only when the queue holds under 3/4
    of the target (waiting w <= T/4 then helps the latecomers more than it costs the queued) and
    lasts at most a quarter of the measured batch time, capped by max_batch_wait_s. At idle the
    target is the lone request itself: no wait, no timer.
    """

    def __init__(self, max_wait_s: float, max_batch_size: int) -> None:
        self.max_wait_s = max_wait_s
        self.max_batch_size = max_batch_size
        self.demand = 0.0
        self.peak = 0
        self.batch_seconds = 0.0  # EWMA of engine time per batch

    def observe_in_flight(self, in_flight: int) -> None:
        self.peak = max(self.peak, in_flight)

    def observe_batch(self, seconds: float) -> None:
        self.batch_seconds = seconds if self.batch_seconds == 0 else 0.8 * self.batch_seconds + 0.2 * seconds

    def plan(self, queued: int, running: int, in_flight: int, free_slots: int) -> tuple[int, float]:
        """(target batch size, seconds to wait for it); 0 seconds = dispatch now."""
        self.demand = max(float(self.peak), 0.5 * self.demand)
        self.peak = in_flight
        # Several free slots share the expected demand: two batches of 20 beat one of 40 and an
        # idle slot.
        target = min(self.max_batch_size, math.ceil((self.demand - running) / max(free_slots, 1)))
        if self.max_wait_s <= 0 or queued >= 0.75 * target:
            return target, 0.0
        return target, min(self.max_wait_s, 0.25 * self.batch_seconds)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int = 50,
        max_queue_size: int = 512,
        max_batch_wait_s: float = 0.05,
        slots: int = 0,
        executor: Executor | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_batch_wait_s = max_batch_wait_s
        self.slots = slots or engine.concurrency
        # ferry's own pool: engine calls never wait behind KServe's default executor.
        self._executor = executor or ThreadPoolExecutor(self.slots, thread_name_prefix="ferry-engine")
        self._queue: collections.deque[Ticket] = collections.deque()
        self._busy = 0
        self._wake = asyncio.Event()
        self._policy = GatherPolicy(max_batch_wait_s, max_batch_size)
        self._enough = asyncio.Event()  # the queue reached the gathering target
        self._gather_target = max_batch_size + 1  # no gathering in progress
        self._running_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._draining = False
        self._running_batches: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._batch_size_metric = metrics.batch_size_histogram(max_batch_size)
        metrics.SLOTS_TOTAL.set(self.slots)
        metrics.QUEUE_CAPACITY.set(max_queue_size)

    # ---- admission -------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return not (self._draining or self._stopping)

    def submit(self, request: GenerationRequest) -> Ticket:
        """Admits a request or raises at once (never blocks, never queues beyond the limit)."""
        if not self.accepting:
            metrics.REJECTED.labels("draining").inc()
            raise Draining()
        if len(self._queue) >= self.max_queue_size:
            metrics.REJECTED.labels("queue_full").inc()
            raise QueueFull(self.max_queue_size)
        loop = asyncio.get_running_loop()
        now = loop.time()
        ticket = Ticket(
            request=request,
            future=loop.create_future(),
            admitted_at=time.monotonic(),
            deadline=now + request.timeout_s,
            stream=asyncio.Queue() if request.stream else None,
        )
        self._queue.append(ticket)
        self._in_flight += 1
        self._policy.observe_in_flight(self._in_flight)
        self._idle.clear()
        metrics.IN_FLIGHT.inc()
        metrics.QUEUE_DEPTH.set(len(self._queue))
        if self._busy < self.slots:
            self._wake.set()
        if len(self._queue) >= self._gather_target:
            self._enough.set()
        return ticket

    async def generate(self, request: GenerationRequest) -> EngineOutput:
        """Submits and waits; a cancelled caller (client gone) stops costing compute."""
        ticket = self.submit(request)
        try:
            return await self.result(ticket)
        finally:
            self._finish(ticket)

    async def result(self, ticket: Ticket) -> EngineOutput:
        loop = asyncio.get_running_loop()
        remaining = ticket.deadline - loop.time()
        try:
            return await asyncio.wait_for(asyncio.shield(ticket.future), max(remaining, 0.0))
        except TimeoutError:
            stage = "running" if ticket.running else "queued"
            self._abandon(ticket)
            metrics.TIMEOUTS.labels(stage).inc()
            raise DeadlineExceeded(ticket.request.timeout_s, stage) from None
        except asyncio.CancelledError:
            metrics.CANCELLED.labels("running" if ticket.running else "queued").inc()
            self._abandon(ticket)
            raise

    async def stream(self, ticket: Ticket) -> AsyncGenerator[str, None]:
        """Yields token strings as the engine produces them; raises like `result` at the end."""
        assert ticket.stream is not None, "submit with stream=True"
        loop = asyncio.get_running_loop()
        try:
            while True:
                remaining = ticket.deadline - loop.time()
                try:
                    token = await asyncio.wait_for(ticket.stream.get(), max(remaining, 0.0))
                except TimeoutError:
                    stage = "running" if ticket.running else "queued"
                    self._abandon(ticket)
                    metrics.TIMEOUTS.labels(stage).inc()
                    raise DeadlineExceeded(ticket.request.timeout_s, stage) from None
                if token is None:
                    break
                yield token
            await ticket.future  # re-raise an engine failure
        except (asyncio.CancelledError, GeneratorExit):
            if not ticket.enough:
                metrics.CANCELLED.labels("running" if ticket.running else "queued").inc()
            self._abandon(ticket)
            raise
        finally:
            self._finish(ticket)

    def stop_early(self, ticket: Ticket) -> None:
        """The caller has what it wants (e.g. a stop string): stop computing, count no cancel."""
        ticket.enough = True
        self._abandon(ticket)

    def _abandon(self, ticket: Ticket) -> None:
        """The client is gone or out of time: never compute it, or stop its sequence."""
        ticket.cancelled = True
        if not ticket.running:
            with contextlib.suppress(ValueError):  # already taken or failed
                self._queue.remove(ticket)
            metrics.QUEUE_DEPTH.set(len(self._queue))

    def _finish(self, ticket: Ticket) -> None:
        if ticket.finished:
            return
        ticket.finished = True
        self._in_flight -= 1
        metrics.IN_FLIGHT.dec()
        self._check_idle()

    def _check_idle(self) -> None:
        if self._in_flight == 0 and not self._queue and self._busy == 0:
            self._idle.set()

    # ---- the consumer ----------------------------------------------------------------

    async def run(self) -> None:
        """The consumer task. Returns cleanly after `stop()`; survives its own bugs."""
        while not self._stopping:
            try:
                await self._consume()
            except Exception:  # a bug in batch forming must not strand admitted requests
                log.exception("batcher consumer crashed; failing queued requests and restarting")
                for ticket in list(self._queue):
                    _fail(ticket, Unavailable("internal batcher error, retry"))
                self._queue.clear()
                metrics.QUEUE_DEPTH.set(0)

    async def _consume(self) -> None:
        while not self._stopping:
            if self._busy < self.slots and self._queue:
                free = self.slots - self._busy
                target, window = self._policy.plan(len(self._queue), self._running_requests, self._in_flight, free)
                if window > 0:
                    await self._gather(target, window)
                batch = self._take_batch(limit=max(target, 1) if free > 1 else self.max_batch_size)
                if batch:
                    self._dispatch(batch)
                continue
            self._wake.clear()
            await self._wake.wait()

    async def _gather(self, target: int, window_s: float) -> None:
        """Waits at most window_s for the queue to reach target (see GatherPolicy)."""
        self._gather_target = target
        self._enough.clear()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._enough.wait(), window_s)
        finally:
            self._gather_target = self.max_batch_size + 1

    def _take_batch(self, limit: int | None = None) -> list[Ticket]:
        """Up to `limit` (max_batch_size) live requests sharing the head's sampling settings."""
        limit = min(limit or self.max_batch_size, self.max_batch_size)
        loop = asyncio.get_running_loop()
        now = loop.time()
        head_sampling: Sampling | None = None
        taken: list[Ticket] = []
        kept: collections.deque[Ticket] = collections.deque()
        while self._queue:
            ticket = self._queue.popleft()
            if ticket.cancelled or ticket.future.done():
                continue
            if ticket.deadline <= now:
                ticket.cancelled = True
                metrics.TIMEOUTS.labels("queued").inc()
                _fail(ticket, DeadlineExceeded(ticket.request.timeout_s, "queued"))
                continue
            if head_sampling is None:
                head_sampling = ticket.request.sampling
            if len(taken) < limit and ticket.request.sampling == head_sampling:
                taken.append(ticket)
                if len(taken) == limit and head_sampling == GREEDY and not kept:
                    break  # common case: no need to scan the rest
            else:
                kept.append(ticket)
        kept.extend(self._queue)
        self._queue = kept
        metrics.QUEUE_DEPTH.set(len(self._queue))
        return taken

    def _dispatch(self, batch: list[Ticket]) -> None:
        self._busy += 1
        self._running_requests += len(batch)
        metrics.SLOTS_BUSY.set(self._busy)
        task = asyncio.create_task(self._run_batch(batch))
        self._running_batches.add(task)
        task.add_done_callback(self._running_batches.discard)

    async def _run_batch(self, batch: list[Ticket]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for ticket in batch:
            ticket.running = True
            metrics.QUEUE_SECONDS.observe(started - ticket.admitted_at)
        self._batch_size_metric.observe(len(batch))
        items = [EngineItem(t.request.prompt_tokens, t.request.max_new_tokens, t.request.stream) for t in batch]
        listener = _BatchListener(loop, batch)
        try:
            await loop.run_in_executor(
                self._executor, self.engine.generate, items, batch[0].request.sampling, listener
            )
        except Exception as exc:
            log.error("engine failed on a batch of %d: %r", len(batch), exc)
            metrics.ENGINE_FAILURES.inc()
            error = EngineFailed(exc)
            # Answers the engine handed over before failing were queued on the loop ahead of this
            # resumption (call_soon_threadsafe is FIFO), so only unanswered requests fail here.
            for ticket in batch:
                _fail(ticket, error)
        else:
            generated = 0
            for ticket in batch:
                if ticket.future.done() and not ticket.future.cancelled() and ticket.future.exception() is None:
                    output = ticket.future.result()
                    generated += output.generated_tokens
                    metrics.PROMPT_TOKENS.inc(len(ticket.request.prompt_tokens))
                    if ticket.first_token_at is not None:
                        metrics.TIME_TO_FIRST_TOKEN.observe(ticket.first_token_at - ticket.admitted_at)
            metrics.GENERATED_TOKENS.inc(generated)
            metrics.BATCH_TOKENS.observe(generated)
        finally:
            elapsed = time.monotonic() - started
            metrics.ENGINE_SECONDS.observe(elapsed)
            self._policy.observe_batch(elapsed)
            self._running_requests -= len(batch)
            self._busy -= 1
            metrics.SLOTS_BUSY.set(self._busy)
            self._wake.set()
            self._check_idle()

    # ---- lifecycle -------------------------------------------------------------------

    def begin_drain(self) -> None:
        """New requests are refused from now on; admitted ones go on."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """True when every admitted request was answered within the timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def stop(self) -> None:
        """Ends the consumer; anything still queued is failed with 503."""
        self._stopping = True
        for ticket in list(self._queue):
            _fail(ticket, Draining())
        self._queue.clear()
        metrics.QUEUE_DEPTH.set(0)
        self._wake.set()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
