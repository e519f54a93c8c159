"""Engines: what computes a batch. Blocking calls, run in ferry's own thread pool; no asyncio here.

An engine reports progress through a `GenerationListener` from its own thread:
`on_token` for every generated token (its return value stops that sequence: client gone),
and `on_done` as soon as one sequence has all its tokens, so a short request in a batch of
long ones is answered early.

api: the types the batcher and engines share; tracker: per-call bookkeeping; threads: device
and thread layout; ctranslate2_engine: the real engine; simulated: the GPU-speed stand-in.
"""

from predictor.engine.api import (
    GREEDY,
    SHARED,
    Collect,
    Decode,
    Engine,
    EngineItem,
    EngineOutput,
    FinishReason,
    GenerationListener,
    ModelInfo,
    Placement,
    Sampling,
    TokenLogprob,
)
from predictor.engine.ctranslate2_engine import LOGPROB_TOKEN_BUDGET, CTranslate2Engine, _by_token_budget
from predictor.engine.simulated import LatencyModel, SimulatedEngine
from predictor.engine.threads import ThreadPlan, cpu_cores, resolve_compute_type, resolve_device
from predictor.engine.tracker import Renumbered, SequenceTracker

__all__ = [
    "GREEDY",
    "LOGPROB_TOKEN_BUDGET",
    "SHARED",
    "CTranslate2Engine",
    "Collect",
    "Decode",
    "Engine",
    "EngineItem",
    "EngineOutput",
    "FinishReason",
    "GenerationListener",
    "LatencyModel",
    "ModelInfo",
    "Placement",
    "Renumbered",
    "Sampling",
    "SequenceTracker",
    "SimulatedEngine",
    "ThreadPlan",
    "TokenLogprob",
    "_by_token_budget",
    "cpu_cores",
    "resolve_compute_type",
    "resolve_device",
]
