"""The KServe model: `load()` builds the engine and batcher, `start_engine()` runs the batcher's
consumer on the serving loop, `predict()` serves V1 and V2 (REST and gRPC), and `generate()`
is what every other route (/generate, OpenAI) calls."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import kserve
from kserve import InferRequest, InferResponse

from predictor import metrics
from predictor.batcher import Batcher, BatcherError, Draining, GenerationRequest, RequestStream
from predictor.engine import CTranslate2Engine, Engine, EngineOutput, LatencyModel, SimulatedEngine
from predictor.protocols import v1, v2
from predictor.protocols.errors import outcome_of, serving_error
from predictor.protocols.requests import Limits, off_loop, payload_chars
from predictor.settings import Settings

log = logging.getLogger("ferry.model")


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "simulated":
        return SimulatedEngine(
            name=settings.model_name,
            latency=LatencyModel(settings.sim_prefill_s, settings.sim_step_s, settings.sim_step_per_seq_s),
            concurrency=settings.sim_concurrency,
            background_concurrency=settings.sim_background_slots,
            fail_every=settings.sim_fail_every,
            eos_after=settings.sim_eos_after,
        )
    return CTranslate2Engine(
        settings.model_dir,
        name=settings.model_name,
        device=settings.device,
        device_index=settings.device_index,
        compute_type=settings.compute_type,
        inter_threads=None if settings.inter_threads == "auto" else settings.inter_threads,
        intra_threads=None if settings.intra_threads == "auto" else settings.intra_threads,
        background=None if settings.background_tokens > 0 else False,
    )


RecordLater = Callable[[Any, Any, float], None]


class Observed:
    """One request's ferry_requests_total{protocol, outcome} and duration (a plain context
    manager: it runs on every request). With `record_later` (the batcher's), the counter and
    histogram are updated off the answer's path, with the batch's other series."""

    __slots__ = ("protocol", "record_later", "started")

    def __init__(self, protocol: str, record_later: RecordLater | None = None) -> None:
        self.protocol = protocol
        self.record_later = record_later
        self.started = time.monotonic()

    def __enter__(self) -> Observed:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> None:
        self.record(error if error is not None else (kind() if kind is not None else None))

    def record(self, error: BaseException | None) -> None:
        outcome = "ok" if error is None else outcome_of(error)
        counted, timed = _request_series(self.protocol, outcome)
        (self.record_later or _record_now)(counted, timed, time.monotonic() - self.started)


def _record_now(counter: Any, histogram: Any, seconds: float) -> None:
    counter.inc()
    histogram.observe(seconds)


@functools.cache
def _request_series(protocol: str, outcome: str) -> tuple[Any, Any]:
    """The labelled children, looked up once (labels() takes a lock and builds a key)."""
    return metrics.REQUESTS.labels(protocol, outcome), metrics.REQUEST_SECONDS.labels(protocol)


class FerryModel(kserve.Model):
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        super().__init__(settings.model_name)
        self.settings = settings
        self.limits = Limits.from_settings(settings)
        self._given_engine = engine
        self._inference_engine: Engine | None = None  # `self.engine` is KServe's flag (below)
        self._batcher: Batcher | None = None
        self.engine = True  # KServe: run start_engine() on the serving loop
        self.draining = False
        self.serving = False  # the batcher's consumer is running

    # ---- lifecycle -------------------------------------------------------------------

    def load(self) -> bool:
        engine = self._given_engine or build_engine(self.settings)
        info = engine.info
        if not info.real_weights:
            log.warning(
                "serving %s weights from %s: output text is meaningless; performance figures hold",
                info.kind.upper(),
                self.settings.model_dir if info.kind != "simulated" else "SimulatedEngine",
            )
        log.info(
            "engine: %s on %s (%s), %d slot(s) x %s thread(s)%s",
            info.kind,
            info.device,
            info.compute_type,
            info.slots,
            info.threads_per_slot or "auto",
            f", a batch alone gets {info.lone_batch_threads} threads" if info.lone_batch_threads else "",
        )
        if info.background_slots:
            log.info(
                "background lane: %d low-priority (nice 10) slot(s) for requests over %d new tokens",
                info.background_slots,
                self.settings.background_tokens,
            )
        metrics.MODEL_INFO.info(
            {
                "name": info.name,
                "kind": info.kind,
                "device": info.device,
                "compute_type": info.compute_type,
                "slots": str(info.slots),
                "threads_per_slot": str(info.threads_per_slot),
                "lone_batch_threads": str(info.lone_batch_threads),
                "background_slots": str(info.background_slots),
            }
        )
        self._inference_engine = engine
        self._batcher = Batcher(
            engine,
            max_batch_size=self.settings.max_batch_size,
            max_queue_size=self.settings.max_queue_size,
            max_batch_wait_s=self.settings.max_batch_wait_s,
            slots=self.settings.slots,
            chunk_tokens=self.settings.chunk_tokens,
            background_tokens=self.settings.background_tokens,
        )
        self.ready = True
        return self.ready

    @property
    def inference_engine(self) -> Engine:
        """What computes the batches (CTranslate2Engine or SimulatedEngine). Not `engine`:
        KServe's Model uses that name for a flag (run start_engine() on the serving loop)."""
        if self._inference_engine is None:
            raise RuntimeError("load() has not run")
        return self._inference_engine

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise RuntimeError("load() has not run")
        return self._batcher

    async def start_engine(self) -> None:
        self.ready = True
        self.serving = True
        try:
            await self.batcher.run()
        finally:
            self.serving = False  # liveness fails from here on unless the server is stopping
        log.info("batcher stopped")

    def alive(self) -> bool:
        """Liveness: the batcher's consumer runs (or the server is draining on purpose)."""
        return self.draining or (self.ready and self.serving)

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
                return [await batcher.submit(requests[0]).result()]
            streams: list[RequestStream] = []
            try:
                for request in requests:  # submitted together, so they can share a batch
                    streams.append(batcher.submit(request))
                return [await stream.result() for stream in streams]
            except BaseException:
                for stream in streams:
                    stream.close()
                raise
        except BatcherError as exc:
            raise serving_error(exc, self.settings.retry_after_s) from None

    def observe(self, protocol: str) -> Observed:
        """Counts one request by protocol and outcome and times it (`with model.observe(...)`)."""
        return Observed(protocol, self._batcher.record_request if self._batcher is not None else None)

    def check_accepting(self) -> None:
        if self.draining or not self.batcher.accepting:
            raise serving_error(Draining(), self.settings.retry_after_s)

    async def predict(
        self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None
    ) -> dict[str, Any] | InferResponse:
        if isinstance(payload, InferRequest):
            with self.observe("grpc" if payload.from_grpc else "v2"):
                self.check_accepting()
                requests = await off_loop(payload_chars(payload), v2.parse, payload, self.inference_engine, self.limits)
                outputs = await self.generate(requests)
                return v2.response(payload, self.name, outputs)
        with self.observe("v1"):
            self.check_accepting()
            requests = await off_loop(payload_chars(payload), v1.parse, payload, self.inference_engine, self.limits)
            return v1.response(await self.generate(requests))

    # ---- V2 metadata -----------------------------------------------------------------

    def get_input_types(self) -> list[dict[str, Any]]:
        return v2.INPUTS_METADATA

    def get_output_types(self) -> list[dict[str, Any]]:
        return v2.OUTPUTS_METADATA

    def model_parameters(self) -> dict[str, Any]:
        info = self.inference_engine.info
        return {
            "kind": info.kind,
            "real_weights": info.real_weights,
            "source": info.source,
            "device": info.device,
            "compute_type": info.compute_type,
            "slots": info.slots,
            "threads_per_slot": info.threads_per_slot,
            "lone_batch_threads": info.lone_batch_threads,
            "background_slots": info.background_slots,
            "max_batch_size": self.settings.max_batch_size,
            "max_new_tokens_limit": self.settings.max_new_tokens_limit,
            "max_prompt_tokens": self.settings.max_prompt_tokens,
        }
