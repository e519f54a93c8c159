"""The batcher: one bounded queue, one consumer task, N engine slots.

Work-conserving: when a slot is free and requests wait, up to `max_batch_size` of them go to
the engine at once. There is no fixed timer: a lone request goes straight to the engine, and a
short gathering window (see `GatherPolicy`) opens only when a burst is known to be coming.

`submit()` returns a `RequestStream`: text deltas when the caller asked for them, then the
final output or an error. The engine hands each step's (or, on the fast path, each batch's)
results to the loop in one call. Long requests may be decoded in chunks that rejoin the queue
(`chunk_tokens`), so they never hold short ones hostage.

Knows nothing of HTTP, gRPC or CTranslate2: protocols build `GenerationRequest`s and read
`RequestStream`s, the engine computes `EngineItem`s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from predictor import metrics, request_context
from predictor.engine import GREEDY, Engine, EngineItem, EngineOutput, Sampling
from predictor.text import TextAssembler
from predictor.tokenizer import shared_tokenizer

log = logging.getLogger("ferry.batcher")
METRICS_DELAY_S = 0.02  # at most this late, per-request series are recorded (see Batcher)


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
    """The engine raised on a batch: its requests get this generic message and the error id of
    the one log line (with the traceback) that holds the detail."""

    def __init__(self, cause: BaseException, error_id: str = "") -> None:
        self.cause = cause
        self.error_id = error_id or uuid.uuid4().hex[:12]
        super().__init__(
            f"the engine failed on this request's batch (error id {self.error_id}); the details are in the server log"
        )


@dataclass(eq=False)
class GenerationRequest:
    prompt_tokens: list[str]
    max_new_tokens: int
    sampling: Sampling = GREEDY
    timeout_s: float = 30.0
    incremental: bool = False  # the caller reads text deltas as they are generated
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    ignore_eos: bool = False  # True: exactly max_new_tokens (benchmarks); False: the end token ends it


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

    def __init__(self, batcher: Batcher, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._batcher = batcher
        self._loop = loop
        self.admitted_at = time.monotonic()
        self.deadline = loop.time() + request.timeout_s
        self._timer = loop.call_at(self.deadline, batcher._expire, self)
        wants_text = request.incremental or bool(request.stop)
        assembler = TextAssembler(batcher.decode, request.stop) if wants_text else None
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


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _BatchListener:
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


class GatherPolicy:
    """Decides, when a slot frees, whether to wait briefly for more requests.

    Closed-loop clients send their next request as soon as their answer arrives, so a batch's
    answers come back as a burst; dispatching the burst's first arrival alone would split every
    later batch in two (1 + 39, then 20 + 20). So: `demand` is the peak number of requests in
    flight between dispatches (halved each dispatch when traffic falls); the target is demand
    minus what the other slots are running, shared by the free slots. A window opens when the
    queue holds less than the target and closes the moment it is reached; it lasts at most a
    quarter of the measured batch time T (the latecomers of a burst arrive within a millisecond
    or two, and a wait w <= T/4 costs the queued less than a batch missing them), capped by
    max_batch_wait_s. At idle the target is the lone request itself: no wait, no timer.
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
        if self.max_wait_s <= 0 or queued >= target:
            return target, 0.0
        return target, min(self.max_wait_s, 0.5 * self.batch_seconds)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int = 50,
        max_queue_size: int = 512,
        max_batch_wait_s: float = 0.05,
        slots: int = 0,
        chunk_tokens: int = 0,
        executor: Executor | None = None,
    ) -> None:
        self.engine = engine
        self.decode = getattr(engine, "tokenizer", shared_tokenizer()).decode
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_batch_wait_s = max_batch_wait_s
        self.slots = slots or engine.concurrency
        self.chunk_tokens = chunk_tokens
        # ferry's own pool: engine calls never wait behind KServe's default executor.
        self._executor = executor or ThreadPoolExecutor(self.slots, thread_name_prefix="ferry-engine")
        self._queue: collections.deque[RequestStream] = collections.deque()
        self._busy = 0
        self._wake = asyncio.Event()
        self._policy = GatherPolicy(max_batch_wait_s, max_batch_size)
        self._enough: asyncio.Future[None] | None = None  # set when the queue reaches the target
        self._gather_target = max_batch_size + 1  # no gathering in progress
        self._running_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._draining = False
        self._running_batches: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._batch_size_metric = metrics.batch_size_histogram(max_batch_size)
        self._series = metrics.RequestSeries(engine.info.name)
        # Per-request observations wait for the next engine call (when the loop is idle), a
        # scrape, or METRICS_DELAY_S: answering a batch and reading the next one is the serial
        # part of a closed-loop cycle, and a histogram observe costs microseconds of it.
        self._observations: list[tuple[RequestStream, EngineOutput, float]] = []
        self._observe_timer: asyncio.TimerHandle | None = None
        metrics.SLOTS_TOTAL.set(self.slots)
        metrics.QUEUE_CAPACITY.set(max_queue_size)
        # Read when scraped, not written on every request.
        metrics.QUEUE_DEPTH.set_function(lambda: len(self._queue))
        metrics.IN_FLIGHT.set_function(lambda: self._in_flight)

    # ---- admission -------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return not (self._draining or self._stopping)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Admits a request or raises at once (never blocks, never queues beyond the limit)."""
        if not self.accepting:
            metrics.REJECTED.labels("draining").inc()
            raise Draining()
        if len(self._queue) >= self.max_queue_size:
            metrics.REJECTED.labels("queue_full").inc()
            raise QueueFull(self.max_queue_size)
        ticket = RequestStream(self, request, asyncio.get_running_loop())
        self._queue.append(ticket)
        self._in_flight += 1
        self._policy.observe_in_flight(self._in_flight)
        self._idle.clear()
        if self._busy < self.slots:
            self._wake.set()
        if len(self._queue) >= self._gather_target and self._enough is not None:
            _settle(self._enough)
        return ticket

    async def call_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking engine call other than generation (scoring: log-probabilities) on the
        engine's own threads, never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def generate(self, request: GenerationRequest) -> EngineOutput:
        """Submits and collects; a cancelled caller (client gone) stops costing compute."""
        return await self.submit(request).result()

    def _expire(self, ticket: RequestStream) -> None:
        """The request's deadline passed (a timer on the loop, one per request)."""
        if ticket.done:
            return
        stage = "running" if ticket.running else "queued"
        metrics.TIMEOUTS.labels(stage).inc()
        self._abandon(ticket, DeadlineExceeded(ticket.request.timeout_s, stage))

    def _abandon(self, ticket: RequestStream, error: BaseException) -> None:
        """The client is gone or out of time: answered with `error` now, never computed, or its
        sequence stopped at the engine's next step."""
        ticket.cancelled = True
        if not ticket.running:
            with contextlib.suppress(ValueError):  # already taken or failed
                self._queue.remove(ticket)
        ticket._fail(error)

    def _finished(self, ticket: RequestStream) -> None:
        self._in_flight -= 1
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
                    ticket._fail(Unavailable("internal batcher error, retry"))
                self._queue.clear()

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
        loop = asyncio.get_running_loop()
        self._gather_target = target
        self._enough = enough = loop.create_future()
        timer = loop.call_later(window_s, _settle, enough)
        try:
            await enough
        finally:
            timer.cancel()
            self._gather_target = self.max_batch_size + 1
            self._enough = None

    def _take_batch(self, limit: int | None = None) -> list[RequestStream]:
        """Up to `limit` (max_batch_size) live requests of the head's group: the same sampling
        settings, the same EOS handling (CTranslate2 takes both per call), and either all new or
        all continuing a chunked decode (a continuation's prompt holds what it generated so far;
        new prompts padded to it would cost its length)."""
        limit = min(limit or self.max_batch_size, self.max_batch_size)
        head: tuple[Sampling, bool, bool] | None = None
        taken: list[RequestStream] = []
        kept: collections.deque[RequestStream] = collections.deque()
        while self._queue:
            ticket = self._queue.popleft()
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
        kept.extend(self._queue)
        self._queue = kept
        return taken

    def _dispatch(self, batch: list[RequestStream]) -> None:
        alone = self._busy == 0 and not self._queue and self._in_flight == len(batch)
        self._busy += 1
        self._running_requests += len(batch)
        metrics.SLOTS_BUSY.set(self._busy)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for ticket in batch:
            ticket.running = True
            if ticket.dispatched_at is None:
                ticket.dispatched_at = started
        items = self._plan_call(batch)
        listener = _BatchListener(loop, self._deliver, batch, self._series.inter_token)
        generated_before = sum(len(item.generated) for item in items)
        # Submitted now, not from the task: the engine starts without waiting for a loop turn.
        call = loop.run_in_executor(
            self._executor, self.engine.generate, items, batch[0].request.sampling, listener, alone
        )
        task = asyncio.create_task(self._run_batch(batch, items, listener, call, started, generated_before))
        # The engine is busy from here: the loop's bookkeeping costs no cycle time now.
        for ticket in batch:
            metrics.QUEUE_SECONDS.observe(started - ticket.admitted_at)
        self._batch_size_metric.observe(len(batch))
        self.flush_observations()
        self._running_batches.add(task)
        task.add_done_callback(self._running_batches.discard)

    def _plan_call(self, batch: Sequence[RequestStream]) -> list[EngineItem]:
        """Each request's share of this call. With chunking (off by default), a call runs at most
        chunk_tokens steps: a long request decodes in chunks that rejoin the queue (each chunk
        re-reads its prompt plus what it generated), so it never holds a slot for its whole
        length while short ones wait. Measured on CPU and at GPU speed it did not pay for its
        re-reads (docs/performance.md, "Mixed lengths"); it stays an option."""
        remaining = [t.remaining for t in batch]
        steps = max(remaining)
        if self.chunk_tokens:
            steps = min(steps, self.chunk_tokens)
        items = []
        for ticket, left in zip(batch, remaining, strict=True):
            ticket.item.max_new_tokens = min(left, steps)
            ticket.item.final = left <= steps
            items.append(ticket.item)
        return items

    def _deliver(self, events: list[tuple[RequestStream, str | EngineOutput]]) -> None:
        """On the loop: one step's (or one batch's) text deltas and answers."""
        now = time.monotonic()
        for ticket, event in events:
            if isinstance(event, str):
                ticket._push(event)
            elif event.finish_reason == "length" and not ticket.item.final:
                continue  # a chunk ended; _run_batch puts the request back in the queue
            elif ticket._resolve(event):
                self._observations.append((ticket, event, now))
        if self._observations and self._observe_timer is None:
            self._observe_timer = asyncio.get_running_loop().call_later(METRICS_DELAY_S, self.flush_observations)

    def flush_observations(self) -> None:
        """Records the answered requests' per-request series (see _observations)."""
        if self._observe_timer is not None:
            self._observe_timer.cancel()
            self._observe_timer = None
        observations, self._observations = self._observations, []
        series = self._series
        for ticket, output, answered_at in observations:
            prompt_tokens = len(ticket.request.prompt_tokens)
            generated = len(output.tokens)
            metrics.PROMPT_TOKENS.inc(prompt_tokens)
            series.finished[output.finish_reason].inc()
            series.prompt_tokens.observe(prompt_tokens)
            series.generation_tokens.observe(generated)
            if generated and ticket.dispatched_at is not None:
                series.time_per_output_token.observe((answered_at - ticket.dispatched_at) / generated)
            if ticket.first_token_at is not None and ticket.request.incremental:
                metrics.TIME_TO_FIRST_TOKEN.observe(ticket.first_token_at - ticket.admitted_at)

    async def _run_batch(
        self,
        batch: list[RequestStream],
        items: list[EngineItem],
        listener: _BatchListener,
        call: asyncio.Future[None],
        started: float,
        generated_before: int,
    ) -> None:
        try:
            await call
        except Exception as exc:
            error = EngineFailed(exc)
            log.error(
                "engine failed on a batch of %d (error id %s; request ids %s)",
                len(batch),
                error.error_id,
                ",".join(t.request_id or "-" for t in batch),
                exc_info=exc,
            )
            metrics.ENGINE_FAILURES.inc()
            # Answers the engine handed over before failing were queued on the loop ahead of this
            # resumption (call_soon_threadsafe is FIFO); what it had not flushed is delivered now.
            self._deliver(listener.take())
            for ticket in batch:
                ticket._fail(error)
        else:
            generated = sum(len(item.generated) for item in items) - generated_before
            metrics.BATCH_TOKENS.observe(generated)
            metrics.GENERATED_TOKENS.inc(generated)
            self._requeue_unfinished(batch)
        finally:
            elapsed = time.monotonic() - started
            metrics.ENGINE_SECONDS.observe(elapsed)
            self._policy.observe_batch(elapsed)
            self._running_requests -= len(batch)
            self._busy -= 1
            metrics.SLOTS_BUSY.set(self._busy)
            self._wake.set()
            self._check_idle()

    def _requeue_unfinished(self, batch: Sequence[RequestStream]) -> None:
        """Requests with chunks to go rejoin the queue at its head (they have waited already)."""
        for ticket in reversed(batch):
            ticket.running = False
            if ticket.done:
                continue
            if ticket.cancelled:
                ticket._fail(asyncio.CancelledError())
                continue
            if self._stopping:
                ticket._fail(Draining())
                continue
            self._queue.appendleft(ticket)

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
        self.flush_observations()
        self._stopping = True
        for ticket in list(self._queue):
            ticket._fail(Draining())
        self._queue.clear()
        self._wake.set()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
