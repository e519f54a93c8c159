"""What several test modules do the same way, written once: a batcher running on an engine (and
let go afterwards), the fake engine held on a first request, a ferry server for the length of a
fixture, the OpenAI client and a streamed call, gRPC text requests and the protocol limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

from loadtest.hostile import _grpc, _grpc_text
from predictor.batcher import Batcher, GenerationRequest
from predictor.engine import EngineOutput
from predictor.protocols.requests import Limits
from tests.conftest import REFERENCE_PROMPT, FerryProcess, start_ferry
from tests.fakes import WAIT_S, Call, GatedEngine

# The simulated engine with no latency at all: for servers whose tests are about the protocol.
INSTANT_ENGINE: dict[str, Any] = {"engine": "simulated", "sim_prefill_s": 0, "sim_step_s": 0, "sim_step_per_seq_s": 0}


# ---- the batcher -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_batcher(engine: Any, **settings: Any) -> AsyncIterator[Batcher]:
    """A Batcher on `engine` with its consumer running. On the way out, pass or fail, a fake
    engine's held calls are let go, the consumer is stopped and awaited and the batcher closed."""
    batcher = Batcher(engine, **settings)
    consumer = asyncio.create_task(batcher.run())
    try:
        yield batcher
    finally:
        if isinstance(engine, GatedEngine):
            engine.release_all()
        batcher.stop()
        await asyncio.wait_for(consumer, WAIT_S)
        batcher.close()


@dataclass
class Occupied:
    """A first request that the fake engine is holding: whatever is submitted meanwhile queues."""

    engine: GatedEngine
    task: asyncio.Task[EngineOutput]
    call: Call

    async def release(self, *, free_engine: bool = True) -> EngineOutput:
        """Lets the held call finish and returns its output; with `free_engine` every later
        engine call also runs through without holding."""
        if free_engine:
            self.engine.auto_release = True
        self.call.release.set()
        return await asyncio.wait_for(self.task, WAIT_S)


async def occupy(batcher: Batcher, engine: GatedEngine, request: GenerationRequest) -> Occupied:
    """Submits `request` and waits until it is the engine's first call, held there."""
    task = asyncio.create_task(batcher.generate(request))
    (call,) = await asyncio.to_thread(engine.wait_for_calls, 1)
    return Occupied(engine, task, call)


# ---- servers and clients ---------------------------------------------------------------------


@contextlib.contextmanager
def serving(tmp_dir: Path, **settings: Any) -> Iterator[FerryProcess]:
    """A ferry started with `settings` (see tests.conftest.start_ferry), killed on the way out."""
    server = start_ferry(tmp_dir, **settings)
    try:
        yield server
    finally:
        server.process.kill()
        server.process.wait()


def openai_client(ferry: FerryProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ferry.url}/openai/v1", api_key="unused", max_retries=0, timeout=60)


def streamed(create: Callable[..., Any], **kwargs: Any) -> list[Any]:
    """Every chunk of a streamed OpenAI create call (`client.completions.create` or
    `client.chat.completions.create`), the final usage-only chunk included."""
    return list(create(**kwargs, stream=True, stream_options={"include_usage": True}))


def infer_parameter(value: int | pb.InferParameter) -> pb.InferParameter:
    if isinstance(value, pb.InferParameter):
        return value
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    return pb.InferParameter(int64_param=value)


def grpc_text_request(
    model: str, text: str | bytes = REFERENCE_PROMPT, **parameters: int | pb.InferParameter
) -> pb.ModelInferRequest:
    """A ModelInferRequest with one BYTES `text` tensor; plain ints and bools among the
    parameters become int64 and bool parameters (loadtest.hostile builds the message)."""
    raw = text.encode() if isinstance(text, str) else text
    return _grpc_text(model, raw, **{name: infer_parameter(value) for name, value in parameters.items()})


def grpc_code(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status a gRPC call ends with (OK when it returns)."""
    return grpc.StatusCode[_grpc(call)]


def limits(max_prompt_tokens: int = 64) -> Limits:
    """Small protocol limits for parsing tests."""
    return Limits(
        default_max_new_tokens=16,
        max_new_tokens=64,
        max_prompt_tokens=max_prompt_tokens,
        max_instances=4,
        request_timeout_s=30,
        max_request_timeout_s=60,
    )
