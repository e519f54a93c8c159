"""KServe's gRPC server as ferry runs it."""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Any

from grpc import aio
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.server import GRPCServer

from predictor.auth import GuardInterceptor
from predictor.front.grpc_ids import RequestIdInterceptor
from predictor.front.kserve_errors import ErrorInterceptor, FerryServicer
from predictor.tls import TLSFiles

log = logging.getLogger("ferry.server")


class BoundGRPCServer(GRPCServer):
    """KServe's gRPC server, bound to a chosen host instead of [::], with the API key and
    repository guard, ferry's error statuses, messages bounded like HTTP bodies, and TLS from
    the REST server's certificate when it has one."""

    def __init__(
        self,
        host: str,
        *args: Any,
        guard: GuardInterceptor,
        max_message_bytes: int,
        tls: TLSFiles | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._host = host
        self._guard = guard
        self._max_message_bytes = max_message_bytes
        self._tls = tls
        self.close_grace_s: float | None = None  # set by the drain: admitted work is done

    async def start(self, max_workers: int) -> None:
        servicer = FerryServicer(self._data_plane, self._model_repository_extension)
        receive_limit = min(self._max_message_bytes, self._kwargs.get("grpc_max_receive_message_length") or 1 << 31)
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            # Request ids outermost: refusals by the guard carry x-request-id too.
            interceptors=(RequestIdInterceptor(), self._guard, ErrorInterceptor()),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                # The same byte limit as HTTP bodies: a bigger message is refused by gRPC itself
                # (RESOURCE_EXHAUSTED) before it is parsed or tokenised.
                ("grpc.max_receive_message_length", receive_limit),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        host = f"[{self._host}]" if ":" in self._host else self._host
        if self._tls is not None:
            self._server.add_secure_port(f"{host}:{self._port}", self._tls.grpc_credentials())
        else:
            self._server.add_insecure_port(f"{host}:{self._port}")
        log.info("gRPC server listening on %s:%s%s", host, self._port, " (TLS)" if self._tls else "")
        await self._server.start()
        await self._server.wait_for_termination()

    async def stop(self, sig: int | None = None) -> None:
        if self._server is not None:
            grace = self.close_grace_s if self.close_grace_s is not None else self._grace_period
            await self._server.stop(grace=grace)
