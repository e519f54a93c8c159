"""The batcher's event-stream contract, with the fake engine held by events: text deltas only
when asked for, then one final output; or an error (engine failure, deadline); leaving early
stops the sequence. Plain callers collect the same stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from predictor.batcher import (
    Batcher,
    DeadlineExceeded,
    EngineFailed,
    GenerationRequest,
    RequestStream,
    TextDelta,
)
from predictor.engine import EngineOutput
from tests.fakes import WAIT_S, GatedEngine
from tests.helpers import occupy, running_batcher


def req(word: str, tokens: int = 3, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(["</s>", word], tokens, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def batcher() -> AsyncIterator[tuple[Batcher, GatedEngine]]:
    engine = GatedEngine(hold_at_step=-1)  # never holds unless a test says so
    engine.auto_release = True
    async with running_batcher(engine, max_batch_size=8) as running:
        yield running, engine


async def events(stream: RequestStream) -> list[TextDelta | EngineOutput]:
    return [event async for event in stream]


async def test_incremental_request_gets_deltas_then_one_final(batcher: tuple[Batcher, GatedEngine]) -> None:
    running, _ = batcher
    got = await asyncio.wait_for(events(running.submit(req("w", incremental=True))), WAIT_S)
    *deltas, final = got
    assert all(isinstance(d, TextDelta) for d in deltas) and isinstance(final, EngineOutput)
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == final.text
    assert final.tokens == ["w0", "w1", "w2"] and final.finish_reason == "length"


async def test_plain_request_gets_only_the_final(batcher: tuple[Batcher, GatedEngine]) -> None:
    running, _ = batcher
    got = await asyncio.wait_for(events(running.submit(req("p"))), WAIT_S)
    assert len(got) == 1 and isinstance(got[0], EngineOutput) and got[0].text == "p0 p1 p2"
    assert await running.submit(req("q")).result() == EngineOutput("q0 q1 q2", ["q0", "q1", "q2"])


async def test_stop_string_ends_the_text_and_the_sequence(batcher: tuple[Batcher, GatedEngine]) -> None:
    running, engine = batcher
    output = await asyncio.wait_for(running.submit(req("s", tokens=10, stop=("s2",))).result(), WAIT_S)
    assert output.finish_reason == "stop" and "s2" not in output.text
    assert engine.calls[-1].steps_run == 3, "the engine stopped at the step that completed the stop string"


async def test_engine_failure_is_raised_from_the_stream() -> None:
    engine = GatedEngine()
    engine.auto_release = True
    engine.fail_calls = {0}
    async with running_batcher(engine) as running:
        with pytest.raises(EngineFailed):
            await asyncio.wait_for(events(running.submit(req("f", incremental=True))), WAIT_S)


async def test_deadline_mid_stream_raises_after_the_deltas_so_far() -> None:
    engine = GatedEngine(hold_at_step=1)
    async with running_batcher(engine) as running:
        stream = running.submit(req("d", tokens=5, incremental=True, timeout_s=0.5))
        seen: list[str] = []
        with pytest.raises(DeadlineExceeded, match="running"):
            async for event in stream:
                assert isinstance(event, TextDelta)
                seen.append(event.text)
        assert seen == ["d0"]  # the first step's text arrived before the deadline
        await assert_stopped_at_next_step(running, engine, "the expired sequence")


async def test_closing_a_stream_stops_its_sequence() -> None:
    engine = GatedEngine(hold_at_step=1)  # parks after the first step's text went out
    async with running_batcher(engine) as running:
        stream = running.submit(req("c", tokens=10, incremental=True))
        first = await asyncio.wait_for(stream.__anext__(), WAIT_S)
        assert first == TextDelta("c0")
        stream.close()  # the caller leaves (a client gone)
        await assert_stopped_at_next_step(running, engine, "the abandoned sequence")
        with pytest.raises(asyncio.CancelledError):
            await stream.result()


async def assert_stopped_at_next_step(running: Batcher, engine: GatedEngine, what: str) -> None:
    """The only engine call, parked after its first step, is let go: the sequence the batcher
    gave up on must stop at the engine's next step, and the batcher must go idle."""
    (call,) = engine.calls
    call.release.set()
    await asyncio.to_thread(call.finished.wait, WAIT_S)
    assert call.steps_run == 2, f"{what} stopped at the engine's next step"
    assert await running.wait_idle(WAIT_S)


async def test_a_batch_of_plain_equal_requests_is_handed_back_once() -> None:
    """The fast path: no per-token hand-off; the loop receives the whole batch in one call."""
    engine = GatedEngine(hold_at_step=0)
    async with running_batcher(engine, max_batch_size=8) as running:
        blocker = await occupy(running, engine, req("b", tokens=1))
        streams = [running.submit(req(f"r{i}")) for i in range(5)]
        deliveries: list[int] = []
        original = running._deliver

        def counting(events: list) -> None:  # type: ignore[type-arg]
            deliveries.append(len(events))
            original(events)

        running._deliver = counting  # type: ignore[method-assign]
        outputs = [await blocker.release()]
        outputs += await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), WAIT_S)
        assert [o.generated_tokens for o in outputs] == [1, 3, 3, 3, 3, 3]
        assert deliveries == [5]  # one hand-off for the whole batch, none per token
