"""The batcher: per lane, one bounded queue, one consumer task, N engine slots.

Work-conserving: when a slot is free and requests wait, up to `max_batch_size` of them go to
the engine at once. There is no fixed timer: a lone request goes straight to the engine, and a
short gathering window (see `GatherPolicy`) opens only when a burst is known to be coming.

`submit()` returns a `RequestStream`: text deltas when the caller asked for them, then the
final output or an error. The engine hands each step's (or, on the fast path, each batch's)
results to the loop in one call. Long generations run in the engine's background lane when it
has one (lanes.py), so they never hold short ones hostage.

Knows nothing of HTTP, gRPC or CTranslate2: protocols build `GenerationRequest`s and read
`RequestStream`s, the engine computes `EngineItem`s.

errors: the outcomes; stream: request and stream; gather: the gathering policy; lanes: queue
and slots; listener: the engine thread's side; core: the Batcher.
"""

from predictor.batcher.core import METRICS_DELAY_S, Batcher
from predictor.batcher.errors import (
    BatcherError,
    DeadlineExceeded,
    Draining,
    EngineFailed,
    QueueFull,
    Unavailable,
)
from predictor.batcher.gather import GatherPlan, GatherPolicy
from predictor.batcher.lanes import Lane
from predictor.batcher.listener import BatchListener
from predictor.batcher.stream import Event, GenerationRequest, RequestStream, TextDelta

__all__ = [
    "METRICS_DELAY_S",
    "BatchListener",
    "Batcher",
    "BatcherError",
    "DeadlineExceeded",
    "Draining",
    "EngineFailed",
    "Event",
    "GatherPlan",
    "GatherPolicy",
    "GenerationRequest",
    "Lane",
    "QueueFull",
    "RequestStream",
    "TextDelta",
    "Unavailable",
]
