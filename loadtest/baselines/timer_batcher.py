"""The write-up's "batching daemon": FastAPI + one background task that collects requests into a
batch of at most 50, waiting a fixed 100 ms after the first one before sending a partial batch.

Written as well as the design allows: the engine runs in a thread pool (never on the event
loop), and up to `engine.concurrency` batches run at once (CTranslate2's inter_threads), so it
gets the same engine parallelism as ferry. What stays from the design is the fixed timer: every
partial batch waits the full window, even with one user.

`python -m loadtest.baselines.timer_batcher --port 8091 --inter-threads 2 --intra-threads 1`
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI

from loadtest.baselines.common import Stats, add_routes, main, run_batch
from predictor.engine import Engine, EngineItem, EngineOutput

MAX_BATCH_SIZE = 50
BATCH_TIMEOUT_S = 0.100

Pending = tuple[EngineItem, "asyncio.Future[EngineOutput]"]


class TimerBatcher:
    def __init__(
        self,
        engine: Engine,
        stats: Stats,
        max_batch_size: int = MAX_BATCH_SIZE,
        timeout_s: float = BATCH_TIMEOUT_S,
    ) -> None:
        self.engine = engine
        self.stats = stats
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.slots = asyncio.Semaphore(engine.concurrency)
        self.pool = ThreadPoolExecutor(engine.concurrency, thread_name_prefix="timer-engine")
        self.running: set[asyncio.Task[None]] = set()

    async def submit(self, item: EngineItem) -> EngineOutput:
        future: asyncio.Future[EngineOutput] = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.slots.acquire()  # a batch is only collected when it can be sent
            batch = [await self.queue.get()]
            deadline = loop.time() + self.timeout_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            task = asyncio.create_task(self._compute(batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _compute(self, batch: list[Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.stats.record(len(batch))
            outputs = await loop.run_in_executor(
                self.pool, run_batch, self.engine, [item for item, _ in batch]
            )
            for (_, future), output in zip(batch, outputs, strict=True):
                if not future.done():
                    future.set_result(output)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self.slots.release()


def create_app(engine: Engine) -> FastAPI:
    stats = Stats()
    batcher = TimerBatcher(engine, stats)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        daemon = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            daemon.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await daemon
            batcher.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="timer batcher baseline", lifespan=lifespan)
    add_routes(app, engine, stats, batcher.submit)
    return app


if __name__ == "__main__":
    main(__doc__ or "", create_app, default_port=8091)
