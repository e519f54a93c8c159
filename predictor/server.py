"""KServe's ModelServer, with what ferry adds around it:

- its HTTP front (`predictor.front`): the hot routes (/generate, V1 predict, OpenAI
  completions) served without FastAPI's layers, the body-size limit and disconnect handling
  for every route; model metadata that says which weights are served on KServe's app;
- the bind address (KServe hard-codes 0.0.0.0 / [::]; tests bind 127.0.0.1);
- a drain phase on SIGTERM: not ready and refusing new work at once, admitted work finishes
  within the grace period, then KServe's own shutdown runs and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from concurrent import futures
from types import FrameType
from typing import Any

import kserve
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from grpc import aio
from kserve.model_server import app as kserve_app
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer
from starlette.types import Receive, Scope, Send

from predictor.front import Front, Route
from predictor.front.app import plain_error
from predictor.front.grpc_ids import RequestIdInterceptor
from predictor.model import FerryModel
from predictor.protocols import generate, openai
from predictor.protocols.errors import OVERLOADED, InvalidRequest, ServingError
from predictor.request_context import configure_logging
from predictor.settings import Settings

log = logging.getLogger("ferry.server")


def register_routes(app: FastAPI, model: FerryModel) -> None:
    """ferry's routes on KServe's FastAPI app (the hot ones are served by the front)."""

    @app.get(f"/v2/models/{model.name}")
    async def model_metadata() -> dict[str, Any]:
        # The Open Inference Protocol's model metadata, plus what weights are being served.
        return {
            "name": model.name,
            "versions": [],
            "platform": "ctranslate2",
            "inputs": model.get_input_types(),
            "outputs": model.get_output_types(),
            "parameters": model.model_parameters(),
        }

    openai.register_model_routes(app, model)
    app.add_exception_handler(ServingError, _serving_error_handler)


async def _serving_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServingError)
    status, body = plain_error(exc)
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
    return JSONResponse(body, status_code=status, headers=headers)


def front_routes(model: FerryModel) -> dict[tuple[str, str], Route]:
    """The hot routes, served without FastAPI's layers (same bodies, statuses and metrics)."""

    async def generate_route(body: bytes) -> dict[str, Any]:
        with model.observe("generate"):
            model.check_accepting()
            request = generate.parse(_json(body), model.generator, model.limits)
            (output,) = await model.generate([request])
            return generate.response(output)

    async def v1_route(body: bytes) -> dict[str, Any]:
        if not model.ready:
            raise ServingError(f"Model with name {model.name} is not ready.", OVERLOADED, model.settings.retry_after_s)
        answer = await model.predict(_json(body))
        assert isinstance(answer, dict)
        return answer

    async def openai_route(body: bytes) -> Any:
        return await openai.completions(model, body)

    async def chat_route(body: bytes) -> Any:
        return await openai.chat_completions(model, body)

    return {
        ("POST", "/generate"): Route(generate_route),
        ("POST", f"/v1/models/{model.name}:predict"): Route(v1_route),
        ("POST", f"{openai.DEFAULT_PREFIX}/v1/completions"): Route(
            openai_route, openai.error_status_and_body, "openai", model.observe
        ),
        ("POST", f"{openai.DEFAULT_PREFIX}/v1/chat/completions"): Route(
            chat_route, openai.error_status_and_body, "openai", model.observe
        ),
    }


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("body", f"is not valid JSON ({exc})") from None


class BoundGRPCServer(GRPCServer):
    """KServe's gRPC server, bound to a chosen host instead of [::]."""

    def __init__(self, host: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host = host

    async def start(self, max_workers: int) -> None:
        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(RequestIdInterceptor(), ExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._server.add_insecure_port(f"{host}:{self._port}")
        log.info("gRPC server listening on %s:%s", host, self._port)
        await self._server.start()
        await self._server.wait_for_termination()


def _retry_after_on_uvicorn_503(retry_after_s: int) -> None:
    """uvicorn's own 503 (limit_concurrency) carries no Retry-After; ferry's overload answers do."""
    from uvicorn.protocols.http import h11_impl, httptools_impl

    body = orjson.dumps({"error": "server overloaded: too many open connections"})

    async def service_unavailable(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry_after_s).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    for module in (h11_impl, httptools_impl):
        module.service_unavailable = service_unavailable  # type: ignore[attr-defined]


def _loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop unless `--event_loop asyncio` (KServe's flag): its C event loop cuts ferry's
    per-request cost on the loop (measured at GPU-class rates, see docs/performance.md)."""
    if event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if event_loop == "uvloop":
            raise SystemExit("--event_loop uvloop: uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def _log_like_kserve() -> None:
    """ferry.* loggers write through KServe's configured handlers, in its format."""
    ferry_logger = logging.getLogger("ferry")
    kserve_logger = logging.getLogger("kserve")
    if kserve_logger.handlers and not ferry_logger.handlers:
        for handler in kserve_logger.handlers:
            ferry_logger.addHandler(handler)
        ferry_logger.setLevel(logging.INFO)
        ferry_logger.propagate = False


class FerryModelServer(kserve.ModelServer):
    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        kwargs.setdefault("enable_latency_logging", settings.access_log)
        kwargs.setdefault("grace_period", max(1, math.ceil(settings.drain_grace_s)))
        super().__init__(**kwargs)
        _log_like_kserve()
        self.settings = settings
        self._draining: asyncio.Task[None] | None = None
        if not settings.access_log:
            # Per-request log lines cost about a quarter of KServe's throughput (MEASURED.md).
            logging.getLogger("uvicorn.access").disabled = True
            logging.getLogger("kserve.trace").disabled = True

    def start(self, models: list[kserve.Model]) -> None:
        if self.workers != 1:
            raise SystemExit(
                "ferry runs one ModelServer worker per pod (the engine and batcher live in the "
                "process); scale with pods, not --workers"
            )
        ferry_models = [m for m in models if isinstance(m, FerryModel)]
        routes: dict[tuple[str, str], Route] = {}
        for model in ferry_models:
            register_routes(kserve_app, model)
            routes.update(front_routes(model))
        self._register_and_check_atleast_one_model_is_ready(models)
        rest = RESTServer(
            "kserve.model_server:app",
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
        )
        rest.config.host = self.settings.host
        # After uvicorn's and KServe's logging set-up: request ids (and JSON lines) on every handler.
        configure_logging(self.settings.log_format)
        # Per response: no `server: uvicorn` header, and no X-Forwarded-For rewriting of the
        # client address (it only feeds access logs, off by default; measured ~2 % at high rates).
        rest.config.server_header = False
        rest.config.proxy_headers = self.settings.access_log
        rest.config.app = Front(
            kserve_app,
            routes,
            max_body_bytes=self.settings.max_body_bytes,
            retry_after_s=self.settings.retry_after_s,
        )
        # Past this many connections or requests uvicorn answers 503 without calling the app:
        # under overload the excess never queues in the parser where no deadline applies.
        rest.config.limit_concurrency = self.settings.max_connections
        _retry_after_on_uvicorn_503(self.settings.retry_after_s)
        uvicorn_server = rest._server
        exit_now = uvicorn_server.handle_exit

        def on_signal(sig: int, frame: FrameType | None) -> None:
            if self._draining is not None:
                exit_now(sig, frame)  # second signal: stop waiting
                return
            loop = asyncio.get_running_loop()
            loop.call_soon_threadsafe(self._start_drain, ferry_models, sig, frame, exit_now)

        uvicorn_server.handle_exit = on_signal
        self._rest_server = rest
        self.servers.append(rest.start())
        if self.enable_grpc:
            self._grpc_server = BoundGRPCServer(
                self.settings.host,
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs=vars(kserve.model_server.args),
                grace_period=self.grace_period,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        with asyncio.Runner(loop_factory=_loop_factory(self.event_loop)) as runner:
            asyncio.set_event_loop(runner.get_loop())
            self.setup_event_loop()
            self.register_signal_handler()
            runner.run(self._serve())

    def _start_drain(self, models: list[FerryModel], sig: int, frame: Any, exit_now: Any) -> None:
        self._draining = asyncio.ensure_future(self._drain(models, sig, frame, exit_now))

    async def _drain(self, models: list[FerryModel], sig: int, frame: Any, exit_now: Any) -> None:
        grace = self.settings.drain_grace_s
        log.info("signal %s: draining (not ready, refusing new requests, up to %.1f s)", sig, grace)
        for model in models:
            model.begin_drain()
        results = await asyncio.gather(*(m.batcher.wait_idle(grace) for m in models))
        if all(results):
            log.info("drained: every admitted request was answered")
        else:
            log.warning("grace period over with requests still running; stopping anyway")
        exit_now(sig, frame)
