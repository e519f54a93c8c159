"""KServe's ModelServer, with what ferry adds around it:

- its HTTP front (`predictor.front`): the hot routes (/generate, V1 predict, OpenAI
  completions) served without FastAPI's layers, the body-size limit and disconnect handling
  for every route; model metadata that says which weights are served on KServe's app;
- the bind address (KServe hard-codes 0.0.0.0 / [::]; tests bind 127.0.0.1);
- a drain phase on SIGTERM: not ready and refusing new work at once, admitted work finishes
  within the grace period, then KServe's own shutdown runs and the process exits 0; the
  listener answers 503 + Retry-After until then, and stalled clients never hold it up;
- what a network needs (docs/security.md): the API key (front and gRPC interceptor), TLS from
  KServe's --ssl_* flags for REST and gRPC alike, header limits and read timeouts
  (`predictor.front.guard`), model repository routes off unless enabled, no tracebacks or
  internal text for client errors (`predictor.front.kserve_errors`), liveness that fails when
  the model stops serving (`predictor.dataplane`).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
from collections.abc import Callable
from types import FrameType
from typing import Any

import kserve
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kserve.model_server import app as kserve_app
from starlette.types import Receive, Scope, Send

from predictor import logsafe
from predictor.auth import ApiKey, GuardInterceptor
from predictor.dataplane import FerryDataPlane
from predictor.front import Front, Route
from predictor.front.app import plain_error
from predictor.front.direct import direct_task
from predictor.front.guard import GuardConfig, cut_stalled, protocol_class
from predictor.front.kserve_errors import REPOSITORY_PREFIX, FerryRESTServer
from predictor.grpc_server import BoundGRPCServer
from predictor.model import FerryModel
from predictor.protocols import generate, openai
from predictor.protocols.errors import OVERLOADED, InvalidRequest, ServingError
from predictor.protocols.requests import off_loop
from predictor.request_context import configure_logging
from predictor.settings import Settings
from predictor.tls import TLSFiles

log = logging.getLogger("ferry.server")
# After the drain: the most time answers still being written get before the server closes.
CLOSE_S = 3.0


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
            request = await off_loop(len(body), generate.parse, _json(body), model.inference_engine, model.limits)
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
        ("POST", "/generate"): Route(generate_route, direct=True),
        ("POST", f"/v1/models/{model.name}:predict"): Route(v1_route, direct=True),
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


def _flush_observations(models: list[FerryModel]) -> None:
    for model in models:
        model.batcher.flush_observations()


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
        # Liveness that fails when a model stops serving; V2 bodies that decode as 400s.
        self.dataplane = FerryDataPlane(self.registered_models)
        self._guard = GuardConfig(
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            retry_after_s=settings.retry_after_s,
        )
        self._listeners: list[Any] = []  # kept open through uvicorn's shutdown (answering 503)
        if not settings.access_log:
            # Per-request log lines cost about a quarter of KServe's throughput (measured, echo model).
            logging.getLogger("uvicorn.access").disabled = True
            logging.getLogger("kserve.trace").disabled = True

    def start(self, models: list[kserve.Model]) -> None:
        if self.workers != 1:
            raise SystemExit(
                "ferry runs one ModelServer worker per pod (the engine and batcher live in the "
                "process); scale with pods, not --workers"
            )
        tls = self._tls_files()
        ferry_models = [m for m in models if isinstance(m, FerryModel)]
        self.dataplane.ferry_models = ferry_models
        routes: dict[tuple[str, str], Route] = {}
        for model in ferry_models:
            register_routes(kserve_app, model)
            routes.update(front_routes(model))
        self._register_and_check_atleast_one_model_is_ready(models)
        # Probes and /metrics: open without a key, answered past the connection cap.
        open_paths = ["/", "/metrics", "/v2/health/live", "/v2/health/ready"]
        for model in ferry_models:
            open_paths += [f"/v2/models/{model.name}/ready", f"/v1/models/{model.name}"]
        api_key = self._api_key(open_paths)
        rest = self._rest(tls, open_paths)
        # After uvicorn's and KServe's logging set-up: request ids (and JSON lines) on every handler.
        configure_logging(self.settings.log_format)
        logsafe.install()  # client text escaped and truncated on every log line
        front = Front(
            kserve_app,
            routes,
            max_body_bytes=self.settings.max_body_bytes,
            retry_after_s=self.settings.retry_after_s,
            api_key=api_key,
            # load/unload: not served unless enabled (then behind the API key)
            blocked_prefixes=() if self.settings.control_routes else (REPOSITORY_PREFIX,),
            before_scrape=functools.partial(_flush_observations, ferry_models),
        )
        rest.config.app = front
        if not self.settings.access_log:  # access lines (and X-Forwarded-For) come from ASGI
            self._guard.direct = functools.partial(direct_task, front)
        self._drain_on_signal(rest, ferry_models)
        self._rest_server = rest
        self.servers.append(rest.start())
        if self.enable_grpc:
            self._grpc_server = self._grpc(tls, api_key)
            self.servers.append(self._grpc_server.start(self.max_threads))
        with asyncio.Runner(loop_factory=_loop_factory(self.event_loop)) as runner:
            asyncio.set_event_loop(runner.get_loop())
            self.setup_event_loop()
            self.register_signal_handler()
            # What start-up left alive (imports, the model, KServe's app: ~200k objects) is
            # never scanned again: a full collection over it stalled the loop 80-100 ms.
            gc.collect()
            gc.freeze()
            runner.run(self._serve())

    def _rest(self, tls: TLSFiles | None, open_paths: list[str]) -> FerryRESTServer:
        rest = FerryRESTServer(
            "kserve.model_server:app",
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=tls.certfile if tls else None,
            ssl_keyfile=tls.keyfile if tls else None,
        )
        rest.config.host = self.settings.host
        # Header limits, read timeouts, probes past the connection cap, 503 while closing.
        self._guard.probe_paths = frozenset(path.encode() for path in open_paths)
        rest.config.http = protocol_class(self._guard)
        # Per response: no `server: uvicorn` header, and no X-Forwarded-For rewriting of the
        # client address (it only feeds access logs, off by default; measured ~2 % at high rates).
        rest.config.server_header = False
        rest.config.proxy_headers = self.settings.access_log
        # Past this many connections or requests uvicorn answers 503 without calling the app:
        # under overload the excess never queues in the parser where no deadline applies.
        rest.config.limit_concurrency = self.settings.max_connections
        _retry_after_on_uvicorn_503(self.settings.retry_after_s)
        return rest

    def _drain_on_signal(self, rest: FerryRESTServer, ferry_models: list[FerryModel]) -> None:
        """SIGTERM/SIGINT start a drain; a second signal stops waiting."""
        uvicorn_server = rest._server
        exit_now = uvicorn_server.handle_exit

        def on_signal(sig: int, frame: FrameType | None) -> None:
            if self._draining is not None:
                exit_now(sig, frame)
                return
            loop = asyncio.get_running_loop()
            loop.call_soon_threadsafe(self._start_drain, ferry_models, sig, frame, exit_now)

        uvicorn_server.handle_exit = on_signal

    def _grpc(self, tls: TLSFiles | None, api_key: ApiKey | None) -> BoundGRPCServer:
        return BoundGRPCServer(
            self.settings.host,
            self.grpc_port,
            self.dataplane,
            self.model_repository_extension,
            kwargs=vars(kserve.model_server.args),
            grace_period=self.grace_period,
            guard=GuardInterceptor(api_key, control_routes=self.settings.control_routes),
            max_message_bytes=self.settings.max_body_bytes,
            tls=tls,
        )

    def _tls_files(self) -> TLSFiles | None:
        """KServe's --ssl_certfile/--ssl_keyfile (or KSERVE_TLS_* env): both or neither."""
        certfile, keyfile = self.ssl_certfile, self.ssl_keyfile
        if not certfile and not keyfile:
            return None
        if not certfile or not keyfile:
            raise SystemExit("TLS: --ssl_certfile and --ssl_keyfile must be given together (or neither)")
        return TLSFiles(certfile, keyfile)

    def _api_key(self, open_paths: list[str]) -> ApiKey | None:
        key = self.settings.api_key
        if key is None:
            if self.settings.host not in ("127.0.0.1", "::1", "localhost"):
                log.warning("no API key set: every route is open to anyone who can reach %s", self.settings.host)
            return None
        return ApiKey(key.get_secret_value(), open_paths=open_paths, openai_prefix=openai.DEFAULT_PREFIX)

    async def _serve(self) -> None:
        try:
            await super()._serve()
        finally:
            for listener in self._listeners:  # the 503-answering listener closes last
                listener.close()

    def _start_drain(self, models: list[FerryModel], sig: int, frame: Any, exit_now: Any) -> None:
        self._draining = asyncio.ensure_future(self._drain(models, sig, frame, exit_now))

    async def _drain(self, models: list[FerryModel], sig: int, frame: Any, exit_now: Any) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        grace = self.settings.drain_grace_s
        log.info("signal %s: draining (not ready, refusing new requests, up to %.1f s)", sig, grace)
        for model in models:
            model.begin_drain()
        results = await asyncio.gather(*(m.batcher.wait_idle(grace) for m in models))
        if all(results):
            log.info("drained: every admitted request was answered")
        else:
            log.warning("grace period over with requests still running; stopping anyway")
        # Close: new requests are answered 503 + Retry-After by the listener, which stays open
        # until the process exits; connections still sending a request are cut; answers still
        # being written get what is left of the grace, at least 1 s and at most CLOSE_S.
        close_s = min(CLOSE_S, max(1.0, grace - (loop.time() - started)))
        self._guard.closing = True
        uvicorn_server = self._rest_server._server if self._rest_server is not None else None
        if uvicorn_server is not None:
            cut_stalled(uvicorn_server.server_state)
            uvicorn_server.config.timeout_graceful_shutdown = close_s
            self._listeners, uvicorn_server.servers = list(uvicorn_server.servers), []
        if isinstance(self._grpc_server, BoundGRPCServer):
            self._grpc_server.close_grace_s = close_s
        exit_now(sig, frame)
