"""The batcher: admission, one consumer per lane, dispatch to the engine, answers back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from predictor import metrics
from predictor.batcher.errors import DeadlineExceeded, Draining, EngineFailed, QueueFull, Unavailable
from predictor.batcher.lanes import Lane
from predictor.batcher.listener import BatchListener
from predictor.batcher.stream import GenerationRequest, RequestStream
from predictor.engine import Engine, EngineItem, EngineOutput, Placement
from predictor.tokenizer import shared_tokenizer

log = logging.getLogger("ferry.batcher")
METRICS_DELAY_S = 0.02  # at most this late, per-request series are recorded (see Batcher)
# A dispatched batch's series wait this long: the engine thread has taken the GIL and started
# its call by then (recording them at once held its start back ~0.4 ms per batch of 40).
DISPATCH_METRICS_DELAY_S = 0.001


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
        background_tokens: int = 0,
        executor: Executor | None = None,
    ) -> None:
        self.engine = engine
        self.decode = getattr(engine, "tokenizer", shared_tokenizer()).decode
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_batch_wait_s = max_batch_wait_s
        self.slots = slots or engine.concurrency
        self.chunk_tokens = chunk_tokens
        # Requests asking more new tokens than this go to the engine's background lane, if any.
        self.background_tokens = background_tokens
        self._interactive = Lane(
            "interactive", self.slots, background=False, max_batch_size=max_batch_size, max_wait_s=max_batch_wait_s
        )
        background_slots = engine.background_concurrency if background_tokens > 0 else 0
        self._background = (
            Lane(
                "background",
                background_slots,
                background=True,
                max_batch_size=max_batch_size,
                max_wait_s=max_batch_wait_s,
            )
            if background_slots
            else None
        )
        self._lanes = [lane for lane in (self._interactive, self._background) if lane is not None]
        # ferry's own pool: engine calls never wait behind KServe's default executor.
        workers = sum(lane.slots for lane in self._lanes)
        self._executor = executor or ThreadPoolExecutor(workers, thread_name_prefix="ferry-engine")
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
        self._dispatched: list[tuple[list[RequestStream], float]] = []
        self._requests: list[tuple[Any, Any, float]] = []  # (counter, histogram, seconds)
        self._observe_timer: asyncio.TimerHandle | None = None
        metrics.SLOTS_TOTAL.set(workers)
        metrics.QUEUE_CAPACITY.set(max_queue_size)
        # Read when scraped, not written on every request.
        metrics.QUEUE_DEPTH.set_function(lambda: self.queue_depth)
        metrics.IN_FLIGHT.set_function(lambda: self._in_flight)

    # ---- admission -------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return sum(len(lane.queue) for lane in self._lanes)

    @property
    def accepting(self) -> bool:
        return not (self._draining or self._stopping)

    def lane_for(self, request: GenerationRequest) -> Lane:
        """Long generations with no per-token work run in the background lane (see lanes.py);
        streams and stop strings stay interactive (their per-step callbacks need the GIL, which
        a low-priority thread must never hold)."""
        background = self._background
        if background is not None and request.max_new_tokens > self.background_tokens and not request.needs_text:
            return background
        return self._interactive

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Admits a request or raises at once (never blocks, never queues beyond the limit)."""
        if not self.accepting:
            metrics.REJECTED.labels("draining").inc()
            raise Draining()
        if self.queue_depth >= self.max_queue_size:
            metrics.REJECTED.labels("queue_full").inc()
            raise QueueFull(self.max_queue_size)
        lane = self.lane_for(request)
        ticket = RequestStream(self, lane, request, asyncio.get_running_loop())
        self._in_flight += 1
        self._idle.clear()
        lane.admit(ticket)
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
        sequence stopped at the engine's next step (a background call runs to its end)."""
        ticket.cancelled = True
        if not ticket.running:
            with contextlib.suppress(ValueError):  # already taken or failed
                ticket.lane.queue.remove(ticket)
        ticket._fail(error)

    def _finished(self, ticket: RequestStream) -> None:
        self._in_flight -= 1
        ticket.lane.in_flight -= 1
        self._check_idle()

    def _check_idle(self) -> None:
        if self._in_flight == 0 and all(not lane.queue and lane.busy == 0 for lane in self._lanes):
            self._idle.set()

    # ---- the consumers ---------------------------------------------------------------

    async def run(self) -> None:
        """The consumer tasks, one per lane. Return cleanly after `stop()`."""
        await asyncio.gather(*(self._serve(lane) for lane in self._lanes))

    async def _serve(self, lane: Lane) -> None:
        """One lane's consumer; survives its own bugs."""
        while not self._stopping:
            try:
                await self._consume(lane)
            except Exception:  # a bug in batch forming must not strand admitted requests
                log.exception("batcher consumer crashed; failing queued requests and restarting")
                for ticket in list(lane.queue):
                    ticket._fail(Unavailable("internal batcher error, retry"))
                lane.queue.clear()

    async def _consume(self, lane: Lane) -> None:
        while not self._stopping:
            if lane.busy < lane.slots and lane.queue:
                plan = lane.policy.plan(len(lane.queue), lane.running_requests, lane.in_flight, lane.free_slots)
                if plan.window_s > 0:
                    await lane.gather(plan.target, plan.window_s)
                batch = lane.take_batch(plan.limit)
                if batch:
                    self._dispatch(lane, batch)
                continue
            lane.wake.clear()
            await lane.wake.wait()

    def _dispatch(self, lane: Lane, batch: list[RequestStream]) -> None:
        # Alone: the engine may give this call every core. Not while background work waits or
        # runs: a lone short batch on every core at normal priority would leave the background
        # lane nothing, and it is the least efficient use of the cores.
        alone = lane.busy == 0 and not lane.queue and lane.in_flight == len(batch)
        if alone and not lane.background:
            alone = all(other.in_flight == 0 for other in self._lanes if other is not lane)
        lane.busy += 1
        lane.running_requests += len(batch)
        metrics.SLOTS_BUSY.set(self._busy_slots())
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for ticket in batch:
            ticket.running = True
            if ticket.dispatched_at is None:
                ticket.dispatched_at = started
        items = self._plan_call(batch)
        listener = BatchListener(loop, self._deliver, batch, self._series.inter_token)
        generated_before = sum(len(item.generated) for item in items)
        # Submitted now, not from the task: the engine starts without waiting for a loop turn.
        placement = Placement(alone, lane.background)
        call = loop.run_in_executor(
            self._executor, self.engine.generate, items, batch[0].request.sampling, listener, placement
        )
        task = asyncio.create_task(self._run_batch(lane, batch, items, listener, call, started, generated_before))
        # The engine is busy from here: the loop's bookkeeping costs no cycle time once the
        # engine thread has started its call.
        self._dispatched.append((batch, started))
        self._schedule_flush(DISPATCH_METRICS_DELAY_S)
        self._running_batches.add(task)
        task.add_done_callback(self._running_batches.discard)

    def _busy_slots(self) -> int:
        return sum(lane.busy for lane in self._lanes)

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
        if self._observations:
            self._schedule_flush(METRICS_DELAY_S)

    def record_request(self, counter: Any, histogram: Any, seconds: float) -> None:
        """A protocol's per-request counter and duration, recorded with the batch's series."""
        self._requests.append((counter, histogram, seconds))
        try:
            self._schedule_flush(METRICS_DELAY_S)
        except RuntimeError:  # not on the loop: nothing would flush it later
            self.flush_observations()

    def _schedule_flush(self, delay_s: float) -> None:
        if self._observe_timer is not None:
            if self._observe_timer.when() <= asyncio.get_running_loop().time() + delay_s:
                return
            self._observe_timer.cancel()
        self._observe_timer = asyncio.get_running_loop().call_later(delay_s, self.flush_observations)

    def flush_observations(self) -> None:
        """Records the answered requests' per-request series (see _observations)."""
        if self._observe_timer is not None:
            self._observe_timer.cancel()
            self._observe_timer = None
        requests, self._requests = self._requests, []
        for counter, histogram, seconds in requests:
            counter.inc()
            histogram.observe(seconds)
        dispatched, self._dispatched = self._dispatched, []
        for batch, started in dispatched:
            self._batch_size_metric.observe(len(batch))
            for ticket in batch:
                metrics.QUEUE_SECONDS.observe(started - ticket.admitted_at)
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
        lane: Lane,
        batch: list[RequestStream],
        items: list[EngineItem],
        listener: BatchListener,
        call: asyncio.Future[None],
        started: float,
        generated_before: int,
    ) -> None:
        try:
            await call
        except Exception as exc:
            self._engine_failed(batch, listener, exc)
        else:
            generated = sum(len(item.generated) for item in items) - generated_before
            metrics.BATCH_TOKENS.observe(generated)
            metrics.GENERATED_TOKENS.inc(generated)
            self._requeue_unfinished(batch)
        finally:
            elapsed = time.monotonic() - started
            metrics.ENGINE_SECONDS.observe(elapsed)
            lane.policy.observe_batch(elapsed)
            lane.running_requests -= len(batch)
            lane.busy -= 1
            metrics.SLOTS_BUSY.set(self._busy_slots())
            lane.wake.set()
            self._check_idle()

    def _engine_failed(self, batch: list[RequestStream], listener: BatchListener, exc: Exception) -> None:
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

    def _requeue_unfinished(self, batch: Sequence[RequestStream]) -> None:
        """Requests with chunks to go rejoin their lane's queue at its head (they have waited)."""
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
            ticket.lane.queue.appendleft(ticket)

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
        """Ends the consumers; anything still queued is failed with 503."""
        self.flush_observations()
        self._stopping = True
        for lane in self._lanes:
            for ticket in list(lane.queue):
                ticket._fail(Draining())
            lane.queue.clear()
            lane.wake.set()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
