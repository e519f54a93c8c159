"""KServe's DataPlane with two changes ferry needs on a network:

- liveness (`/v2/health/live`, `/`, gRPC `ServerLive`) fails when a ferry model stopped
  serving (unloaded, or its batcher's consumer ended) while the server is not shutting down,
  so Kubernetes restarts the pod instead of leaving it up and useless;
- decoding a V2 REST body (JSON or the binary-data extension) can only fail as a client
  error (400), never as a 500: every byte of it is the client's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InvalidInput, ServerNotLive
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferRequest

from predictor.protocols.errors import InvalidRequest

if TYPE_CHECKING:
    from predictor.model import FerryModel

BINARY = f"header {INFERENCE_CONTENT_LENGTH_HEADER}"


class FerryDataPlane(DataPlane):
    def __init__(self, model_registry: Any) -> None:
        super().__init__(model_registry=model_registry)
        self.ferry_models: Sequence[FerryModel] = ()

    async def live(self) -> dict[str, str]:
        for model in self.ferry_models:
            if self._model_registry.get_model(model.name) is not model:
                raise ServerNotLive(f"model {model.name} is no longer loaded")
            if not model.alive():
                raise ServerNotLive(f"model {model.name} is not serving")
        return {"status": "alive"}

    def decode_inference_request(self, body: Any, headers: dict[str, str], model_name: str) -> InferRequest:
        if isinstance(body, bytes | bytearray):
            declared = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
            if declared is None:
                raise InvalidRequest(BINARY, "is required with a binary (non-JSON) body")
            if not declared.strip().isdigit():
                raise InvalidRequest(BINARY, "must be a decimal number of bytes")
            length = int(declared)
            if not 0 < length <= len(body):
                raise InvalidRequest(BINARY, f"must be between 1 and the body's {len(body)} bytes, got {length}")
        try:
            request: InferRequest = super().decode_inference_request(body, headers, model_name)
        except InvalidInput:
            raise
        except Exception as exc:  # malformed JSON header, inputs, shapes or binary sizes
            raise InvalidRequest(
                "body",
                "is not a valid inference request (its inputs, shapes, datatypes or binary sizes do not agree)",
            ) from exc
        return request
