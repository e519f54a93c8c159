"""The batcher with a fake engine held by events: dispatch, batch closing, slots, early answers,
admission, deadlines, cancellation and failure isolation. No sleeps, no timing assertions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from predictor.batcher import (
    Batcher,
    DeadlineExceeded,
    Draining,
    EngineFailed,
    GatherPolicy,
    GenerationRequest,
    QueueFull,
)
from predictor.engine import GREEDY, Sampling
from tests.fakes import WAIT_S, GatedEngine
from tests.helpers import occupy, running_batcher


def req(prompt: str = "hello", tokens: int = 2, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(prompt_tokens=["</s>", prompt], max_new_tokens=tokens, **kwargs)  # type: ignore[arg-type]


async def wait_event(event: object) -> None:
    ok = await asyncio.to_thread(event.wait, WAIT_S)  # type: ignore[attr-defined]
    assert ok, "event never set"


def computed_prompts(engine: GatedEngine) -> list[str]:
    """The last prompt token of every request the engine computed, in order."""
    return [item.prompt_tokens[-1] for call in engine.calls for item in call.items]


@pytest.fixture
async def running() -> AsyncIterator[tuple[Batcher, GatedEngine]]:
    engine = GatedEngine()
    async with running_batcher(engine, max_batch_size=4, max_queue_size=20) as batcher:
        yield batcher, engine


async def test_lone_request_goes_to_the_engine_at_once(running: tuple[Batcher, GatedEngine]) -> None:
    held = await occupy(*running, req("alone"))
    # It reached the engine with no other traffic and no timer: the engine is holding it now.
    assert held.call.sizes == 1 and not held.task.done()
    output = await held.release()
    assert output.text == "alone0 alone1" and output.generated_tokens == 2


async def test_requests_pile_up_while_busy_and_batches_close_at_max_size(
    running: tuple[Batcher, GatedEngine],
) -> None:
    batcher, engine = running
    busy = await occupy(batcher, engine, req("first"))
    waiting = [asyncio.create_task(batcher.generate(req(f"p{i}"))) for i in range(10)]
    await asyncio.sleep(0)  # let the submissions run (no time passes)
    assert batcher.queue_depth == 10
    await busy.release()
    outputs = await asyncio.wait_for(asyncio.gather(*waiting), WAIT_S)
    assert [c.sizes for c in engine.calls] == [1, 4, 4, 2]  # max_batch_size 4
    assert [o.text for o in outputs] == [f"p{i}0 p{i}1" for i in range(10)]


async def test_two_slots_run_two_batches_at_once() -> None:
    engine = GatedEngine(concurrency=2)
    async with running_batcher(engine, max_batch_size=8) as batcher:
        a = await occupy(batcher, engine, req("a"))
        b = asyncio.create_task(batcher.generate(req("b")))
        calls = await asyncio.to_thread(engine.wait_for_calls, 2)
        assert not a.call.finished.is_set(), "second batch started while the first still runs"
        for call in calls:
            call.release.set()
        assert (await a.task).text == "a0 a1" and (await b).text == "b0 b1"


async def test_short_request_is_answered_before_its_batch_ends() -> None:
    engine = GatedEngine(hold_at_step=3)
    async with running_batcher(engine, max_batch_size=8) as batcher:
        blocker = await occupy(batcher, engine, req("blocker", tokens=1))
        short = asyncio.create_task(batcher.generate(req("short", tokens=2)))
        long = asyncio.create_task(batcher.generate(req("long", tokens=10)))
        await asyncio.sleep(0)
        await blocker.release(free_engine=False)
        _, mixed = await asyncio.to_thread(engine.wait_for_calls, 2)
        assert mixed.sizes == 2
        await wait_event(mixed.held)  # engine is parked at step 3 of 10
        output = await asyncio.wait_for(short, WAIT_S)
        assert output.generated_tokens == 2 and not long.done() and not mixed.finished.is_set()
        mixed.release.set()
        assert (await long).generated_tokens == 10


async def test_full_queue_rejects_at_once_and_never_queues(running: tuple[Batcher, GatedEngine]) -> None:
    batcher, engine = running
    held = await occupy(batcher, engine, req())
    queued = [batcher.submit(req()) for _ in range(batcher.max_queue_size)]
    with pytest.raises(QueueFull, match="20 waiting"):
        batcher.submit(req())
    assert batcher.queue_depth == 20
    await held.release()
    results = await asyncio.gather(*(t.result() for t in queued))
    assert len(results) == 20


async def test_draining_refuses_new_work_and_finishes_admitted(running: tuple[Batcher, GatedEngine]) -> None:
    batcher, engine = running
    admitted = await occupy(batcher, engine, req("kept"))
    batcher.begin_drain()
    with pytest.raises(Draining):
        batcher.submit(req())
    idle = asyncio.create_task(batcher.wait_idle(WAIT_S))
    await asyncio.sleep(0)
    assert not idle.done()
    assert (await admitted.release(free_engine=False)).text == "kept0 kept1"
    assert await idle


async def test_deadline_while_queued_is_answered_and_never_computed(
    running: tuple[Batcher, GatedEngine],
) -> None:
    batcher, engine = running
    held = await occupy(batcher, engine, req("first"))
    with pytest.raises(DeadlineExceeded, match="queued"):
        await batcher.generate(req("late", timeout_s=0.01))
    assert batcher.queue_depth == 0
    await held.release()
    assert (await batcher.generate(req("next"))).text == "next0 next1"
    assert "late" not in computed_prompts(engine)


async def test_cancelled_while_queued_is_never_computed(running: tuple[Batcher, GatedEngine]) -> None:
    batcher, engine = running
    held = await occupy(batcher, engine, req("first"))
    gone = asyncio.create_task(batcher.generate(req("gone")))
    await asyncio.sleep(0)
    assert batcher.queue_depth == 1
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.queue_depth == 0
    await held.release()
    await batcher.generate(req("after"))
    assert computed_prompts(engine) == ["first", "after"]


async def test_cancelled_while_running_stops_its_sequence() -> None:
    engine = GatedEngine(hold_at_step=2)
    async with running_batcher(engine, max_batch_size=8) as batcher:
        gone = await occupy(batcher, engine, req("gone", tokens=10))
        await wait_event(gone.call.held)
        gone.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone.task
        gone.call.release.set()
        await wait_event(gone.call.finished)
        assert gone.call.steps_run == 3, "the engine stopped the sequence at the next token"


async def test_engine_failure_fails_exactly_that_batch() -> None:
    engine = GatedEngine()
    engine.fail_calls = {1}
    async with running_batcher(engine, max_batch_size=8) as batcher:
        first = await occupy(batcher, engine, req("ok1"))
        doomed = [asyncio.create_task(batcher.generate(req(f"bad{i}"))) for i in range(3)]
        await asyncio.sleep(0)
        assert (await first.release()).text == "ok10 ok11"
        results = await asyncio.gather(*doomed, return_exceptions=True)
        assert all(isinstance(r, EngineFailed) for r in results)
        # The cause is kept (and logged once, under the error id); the message says neither.
        assert "injected failure" in str(results[0].cause) and "injected" not in str(results[0])
        assert "error id" in str(results[0])
        assert (await batcher.generate(req("ok2"))).text == "ok20 ok21"
        assert [c.sizes for c in engine.calls] == [1, 3, 1]


async def test_requests_with_other_sampling_go_to_another_batch(
    running: tuple[Batcher, GatedEngine],
) -> None:
    batcher, engine = running
    held = await occupy(batcher, engine, req("first"))
    hot = Sampling(temperature=0.8, top_k=40)
    tasks = [
        asyncio.create_task(batcher.generate(req("g1"))),
        asyncio.create_task(batcher.generate(req("s1", sampling=hot))),
        asyncio.create_task(batcher.generate(req("g2"))),
        asyncio.create_task(batcher.generate(req("s2", sampling=hot))),
    ]
    await asyncio.sleep(0)
    await held.release()
    await asyncio.gather(*tasks)
    batches = [([i.prompt_tokens[-1] for i in c.items], c.sampling) for c in engine.calls[1:]]
    assert batches == [(["g1", "g2"], GREEDY), (["s1", "s2"], hot)]


async def test_stop_ends_the_consumer_cleanly_and_fails_queued_with_503(
    running: tuple[Batcher, GatedEngine],
) -> None:
    batcher, engine = running
    held = await occupy(batcher, engine, req("first"))
    queued = asyncio.create_task(batcher.generate(req("queued")))
    await asyncio.sleep(0)
    batcher.stop()
    with pytest.raises(Draining):
        await queued
    await held.release(free_engine=False)


def test_gather_policy_never_waits_at_idle_and_waits_for_a_burst() -> None:
    policy = GatherPolicy(max_wait_s=0.05, max_batch_size=50)  # one slot
    policy.observe_batch(0.06)
    policy.observe_in_flight(1)
    assert policy.plan(queued=1, running=0, in_flight=1, free_slots=1) == (1, 0.0, 1)  # a lone user
    policy.observe_in_flight(40)  # 40 closed-loop users: their answers went out as a burst
    assert policy.plan(queued=1, running=0, in_flight=1, free_slots=1) == (40, 0.03, 40)  # T/2
    policy.observe_in_flight(40)
    assert policy.plan(queued=40, running=0, in_flight=40, free_slots=1).window_s == 0.0  # all there: go
    # Traffic falls to one user: the remembered demand halves each dispatch.
    targets = [policy.plan(queued=1, running=0, in_flight=1, free_slots=1).target for _ in range(6)]
    assert targets == [40, 20, 10, 5, 3, 2]  # 40 were in flight at the last busy dispatch
    assert GatherPolicy(max_wait_s=0.0, max_batch_size=50).plan(1, 0, 40, 1).window_s == 0.0
    capped = GatherPolicy(max_wait_s=0.01, max_batch_size=50)
    capped.observe_batch(1.0)
    capped.observe_in_flight(40)
    assert capped.plan(queued=1, running=0, in_flight=1, free_slots=1) == (40, 0.01, 40)  # the cap


def test_gather_policy_balances_two_slots_and_leaves_the_1_plus_39_trap() -> None:
    policy = GatherPolicy(max_wait_s=0.05, max_batch_size=50, slots=2)
    policy.observe_batch(0.06)
    policy.observe_in_flight(40)
    assert policy.plan(queued=1, running=0, in_flight=1, free_slots=2) == (20, 0.03, 20)  # two slots share
    policy.observe_in_flight(40)
    assert policy.plan(queued=1, running=20, in_flight=21, free_slots=1) == (20, 0.03, 20)
    # The trap: one slot runs 39, the other's lone request came back. Only it can arrive now,
    # so it goes at once...
    policy.observe_in_flight(40)
    assert policy.plan(queued=1, running=39, in_flight=40, free_slots=1) == (1, 0.0, 20)
    # ...and when the 39 come back while the 1 runs, this slot takes its share, not all 39:
    # the rest join the lone request's return, and the next cycle is 20 + 20.
    policy.observe_in_flight(40)
    assert policy.plan(queued=39, running=1, in_flight=40, free_slots=1) == (20, 0.0, 20)
    many = GatherPolicy(max_wait_s=0.05, max_batch_size=50, slots=2)
    many.observe_in_flight(128)
    assert many.plan(queued=128, running=0, in_flight=128, free_slots=2).limit == 50  # max_batch_size


async def test_a_returning_burst_is_gathered_into_one_batch() -> None:
    engine = GatedEngine()
    async with running_batcher(engine, max_batch_size=8, max_batch_wait_s=WAIT_S) as batcher:
        batcher._interactive.policy.batch_seconds = 4 * WAIT_S  # a slow engine: the window is the WAIT_S cap
        first = await occupy(batcher, engine, req("first"))
        users = [asyncio.create_task(batcher.generate(req(f"u{i}"))) for i in range(3)]
        await asyncio.sleep(0)
        await first.release(free_engine=False)
        for _ in range(3):
            await asyncio.sleep(0)
        # 4 were in flight: the 3 waiting are held for the one whose answer just went out...
        assert len(engine.calls) == 1 and batcher.queue_depth == 3, "the burst waits for its returner"
        again = asyncio.create_task(batcher.generate(req("again")))  # ...who comes back at once
        _, call1 = await asyncio.to_thread(engine.wait_for_calls, 2)
        assert call1.sizes == 4  # the target was reached: no need to wait out the window
        engine.release_all()
        await asyncio.gather(again, *users)
        assert [c.sizes for c in engine.calls] == [1, 4]
