"""The KServe model: `load()` builds the engine and batcher, `start_engine()` runs the batcher's
consumer on the serving loop, `predict()` serves V1 and V2 (REST and gRPC), and `generate()`
is what every other route (/generate, OpenAI) calls."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import kserve
from kserve import InferRequest, InferResponse

from predictor import metrics
from predictor.batcher import Batcher, BatcherError, Draining, GenerationRequest
from predictor.engine import CTranslate2Engine, Engine, EngineOutput, LatencyModel, SimulatedEngine
from predictor.protocols import v1, v2
from predictor.protocols.errors import from_batcher_error, outcome_of
from predictor.protocols.requests import Limits
from predictor.settings import Settings

log = logging.getLogger("ferry.model")


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "simulated":
        return SimulatedEngine(
            name=settings.model_name,
            latency=LatencyModel(settings.sim_prefill_s, settings.sim_step_s, settings.sim_step_per_seq_s),
            concurrency=settings.sim_concurrency,
            fail_every=settings.sim_fail_every,
        )
    return CTranslate2Engine(
        settings.model_dir,
        name=settings.model_name,
        device=settings.device,
        device_index=settings.device_index,
        compute_type=settings.compute_type,
        inter_threads=settings.inter_threads,
        intra_threads=settings.intra_threads,
    )


class FerryModel(kserve.Model):
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        super().__init__(settings.model_name)
        self.settings = settings
        self.limits = Limits.from_settings(settings)
        self._given_engine = engine
        self._generator: Engine | None = None
        self._batcher: Batcher | None = None
        self.engine = True  # KServe: run start_engine() on the serving loop
        self.draining = False

    # ---- lifecycle -------------------------------------------------------------------

    def load(self) -> bool:
        generator = self._given_engine or build_engine(self.settings)
        info = generator.info
        if not info.real_weights:
            log.warning(
                "serving %s weights from %s: output text is meaningless; performance figures hold",
                info.kind.upper(),
                self.settings.model_dir if info.kind != "simulated" else "SimulatedEngine",
            )
        metrics.MODEL_INFO.info(
            {"name": info.name, "kind": info.kind, "device": info.device, "compute_type": info.compute_type}
        )
        self._generator = generator
        self._batcher = Batcher(
            generator,
            max_batch_size=self.settings.max_batch_size,
            max_queue_size=self.settings.max_queue_size,
            max_batch_wait_s=self.settings.max_batch_wait_s,
            slots=self.settings.slots,
        )
        self.ready = True
        return self.ready

    @property
    def generator(self) -> Engine:
        if self._generator is None:
            raise RuntimeError("load() has not run")
        return self._generator

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise RuntimeError("load() has not run")
        return self._batcher

    async def start_engine(self) -> None:
        self.ready = True
        await self.batcher.run()
        log.info("batcher stopped")

    def stop_engine(self) -> None:
        self.ready = False
        if self._batcher is not None:
            self._batcher.stop()
            self._batcher.close()

    def begin_drain(self) -> None:
        """SIGTERM: not ready at once, refuse new work, let admitted work finish."""
        self.draining = True
        self.batcher.begin_drain()

    async def healthy(self) -> bool:
        return self.ready and not self.draining

    # ---- serving ---------------------------------------------------------------------

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[EngineOutput]:
        """Each prompt goes through the batcher on its own; the call fails if any prompt fails."""
        batcher = self.batcher
        try:
            if len(requests) == 1:
                return [await batcher.generate(requests[0])]
            tasks = [asyncio.ensure_future(batcher.generate(r)) for r in requests]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
        except BatcherError as exc:
            raise from_batcher_error(exc, self.settings.retry_after_s) from None

    @asynccontextmanager
    async def observe(self, protocol: str) -> AsyncIterator[None]:
        """Counts one request by protocol and outcome and times it."""
        started = time.monotonic()
        outcome = "ok"
        try:
            yield
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            metrics.REQUESTS.labels(protocol, outcome).inc()
            metrics.REQUEST_SECONDS.labels(protocol).observe(time.monotonic() - started)

    def check_accepting(self) -> None:
        if self.draining or not self.batcher.accepting:
            raise from_batcher_error(Draining(), self.settings.retry_after_s)

    async def predict(
        self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None
    ) -> dict[str, Any] | InferResponse:
        if isinstance(payload, InferRequest):
            async with self.observe("grpc" if payload.from_grpc else "v2"):
                self.check_accepting()
                requests = v2.parse(payload, self.generator, self.limits)
                outputs = await self.generate(requests)
                return v2.response(payload, self.name, outputs)
        async with self.observe("v1"):
            self.check_accepting()
            requests = v1.parse(payload, self.generator, self.limits)
            return v1.response(await self.generate(requests))

    # ---- V2 metadata -----------------------------------------------------------------

    def get_input_types(self) -> list[dict[str, Any]]:
        return v2.INPUTS_METADATA

    def get_output_types(self) -> list[dict[str, Any]]:
        return v2.OUTPUTS_METADATA

    def model_parameters(self) -> dict[str, Any]:
        info = self.generator.info
        return {
            "kind": info.kind,
            "real_weights": info.real_weights,
            "source": info.source,
            "device": info.device,
            "compute_type": info.compute_type,
            "max_batch_size": self.settings.max_batch_size,
            "max_new_tokens_limit": self.settings.max_new_tokens_limit,
            "max_prompt_tokens": self.settings.max_prompt_tokens,
        }
