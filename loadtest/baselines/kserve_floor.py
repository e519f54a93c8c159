"""KServe's floor: a `kserve.Model` whose predict answers at once, on KServe's own ModelServer
(V1 REST, default logging off like ferry's), bound to 127.0.0.1. Its request rate is what
KServe itself allows; a server on KServe is measured against it.

    python -m loadtest.baselines.kserve_floor --port 8095
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kserve
from kserve.model_server import app as kserve_app
from kserve.protocol.rest.server import RESTServer

from loadtest.baselines.common import loopback_parser


class InstantModel(kserve.Model):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ready = True

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        instances = payload.get("instances", [None]) if isinstance(payload, dict) else [None]
        return {"predictions": [{"generated_text": "", "generated_tokens": 0} for _ in instances]}


class LoopbackModelServer(kserve.ModelServer):
    """KServe's ModelServer, REST only, bound to one host (KServe binds 0.0.0.0)."""

    def __init__(self, host: str, **kwargs: Any) -> None:
        super().__init__(enable_grpc=False, enable_latency_logging=False, **kwargs)
        self.host = host

    def start(self, models: list[kserve.Model]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        rest = RESTServer(
            "kserve.model_server:app",
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            workers=1,
        )
        rest.config.host = self.host
        rest.config.app = kserve_app
        self.servers.append(rest.start())
        # The same event loop as ferry (uvloop), so the floor is KServe at its best, not a
        # handicapped denominator.
        with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
            asyncio.set_event_loop(runner.get_loop())
            self.setup_event_loop()
            runner.run(self._serve())


def _uvloop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = loopback_parser(__doc__ or "", default_port=8095)
    parser.add_argument("--model-name", default="opt-125m")
    args = parser.parse_args()
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).disabled = True
    LoopbackModelServer(args.host, http_port=args.port).start([InstantModel(args.model_name)])


if __name__ == "__main__":
    main()
