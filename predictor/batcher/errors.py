"""The batcher's outcomes other than an answer; protocols map each to a status code
(predictor/protocols/errors.py)."""

from __future__ import annotations

import uuid


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
