"""The background lane: long generations run on low-priority generators (CPU) and never hold
short requests hostage; streams, stop strings and short requests stay interactive."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from predictor.batcher import GenerationRequest
from predictor.engine import (
    Collect,
    CTranslate2Engine,
    EngineItem,
    LatencyModel,
    Placement,
    Sampling,
    SimulatedEngine,
    ThreadPlan,
)
from predictor.engine.threads import BACKGROUND_NICE, at_low_priority, low_priority_supported
from tests.conftest import ensure_tiny_model
from tests.fakes import GatedEngine
from tests.helpers import occupy, running_batcher

PROMPT = ["</s>", "ĠHello", "ĠWorld"]
needs_nice = pytest.mark.skipif(not low_priority_supported(), reason="per-thread nice values are Linux's")


def low_priority_threads() -> set[int]:
    """Native ids of this process's threads at the background lane's nice value."""
    low = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            if os.getpriority(os.PRIO_PROCESS, int(tid)) == BACKGROUND_NICE:
                low.add(int(tid))
        except OSError:  # the thread ended meanwhile
            pass
    return low


def test_thread_plan_has_a_background_lane_on_cpu_only() -> None:
    assert ThreadPlan.choose("cpu", None, None, 2).background == low_priority_supported()
    assert not ThreadPlan.choose("cpu", None, None, 2, background=False).background
    assert not ThreadPlan.choose("cuda", None, None, 16).background


@needs_nice
def test_at_low_priority_returns_and_leaves_the_caller_alone() -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert at_low_priority(lambda: os.getpriority(os.PRIO_PROCESS, 0)) == BACKGROUND_NICE
    assert os.getpriority(os.PRIO_PROCESS, 0) == own
    with pytest.raises(ZeroDivisionError):
        at_low_priority(lambda: 1 // 0)


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return ensure_tiny_model()


@needs_nice
def test_background_generators_run_at_low_priority_and_answer_the_same(tiny_model: Path) -> None:
    before = low_priority_threads()
    engine = CTranslate2Engine(tiny_model, name="tiny", device="cpu", compute_type="int8")
    try:
        assert engine.background_concurrency == engine.plan.slots
        assert engine.info.background_slots == engine.plan.slots
        answers = {}
        for background in (False, True):
            # The background generators are built on the first background call, not before.
            assert low_priority_threads() - before == set()
            items = [EngineItem(list(PROMPT), 12, ignore_eos=True), EngineItem(list(PROMPT[:2]), 5, ignore_eos=True)]
            collect = Collect(len(items))
            engine.generate(items, Sampling(), collect, Placement(background=background))
            answers[background] = [(o.tokens, o.finish_reason) for o in collect.outputs if o is not None]
        # CTranslate2 starts each generator's worker threads in its constructor: the background
        # generators' workers inherited the builder's nice value, the interactive ones did not.
        assert len(low_priority_threads() - before) >= engine.plan.slots
        # A background call runs without per-step callbacks; the shorter sequence is still cut
        # at its own count.
        assert answers[True] == answers[False]
        assert [len(tokens) for tokens, _ in answers[True]] == [12, 5]
    finally:
        engine.close()


def test_no_background_generators_when_switched_off(tiny_model: Path) -> None:
    before = low_priority_threads()
    engine = CTranslate2Engine(tiny_model, name="tiny", device="cpu", compute_type="int8", background=False)
    try:
        assert engine.background_concurrency == 0
        assert low_priority_threads() - before == set()
    finally:
        engine.close()


async def test_requests_are_routed_by_length_and_per_token_work() -> None:
    engine = SimulatedEngine(name="sim", concurrency=1, background_concurrency=1)
    async with running_batcher(engine, background_tokens=32) as batcher:
        def lane(**fields: object) -> str:
            return batcher.lane_for(GenerationRequest(list(PROMPT), **fields)).name  # type: ignore[arg-type]

        assert lane(max_new_tokens=32) == "interactive"
        assert lane(max_new_tokens=33) == "background"
        assert lane(max_new_tokens=100, incremental=True) == "interactive"
        assert lane(max_new_tokens=100, stop=("x",)) == "interactive"
    async with running_batcher(engine, background_tokens=0) as batcher:
        assert batcher.lane_for(GenerationRequest(list(PROMPT), 100)).name == "interactive"


async def test_a_short_request_is_answered_while_a_long_batch_runs() -> None:
    # One interactive slot and one background slot: the long batch holds only the background one.
    engine = SimulatedEngine(
        name="sim", latency=LatencyModel(0.0, 0.01, 0.0), concurrency=1, background_concurrency=1
    )
    async with running_batcher(engine, background_tokens=32, max_batch_wait_s=0) as batcher:
        long = batcher.submit(GenerationRequest(list(PROMPT), 100, ignore_eos=True))
        long_result = asyncio.ensure_future(long.result())
        for _ in range(3):  # one after another, each answered while the long one runs
            short = await batcher.generate(GenerationRequest(list(PROMPT), 5, ignore_eos=True))
            assert len(short.tokens) == 5
            assert not long.done
        output = await long_result
        assert len(output.tokens) == 100 and output.finish_reason == "length"


async def test_a_lone_short_batch_takes_every_core_only_when_no_background_work_is_in_flight() -> None:
    engine = GatedEngine(concurrency=2)
    engine.background_concurrency = 1
    async with running_batcher(engine, background_tokens=4, max_batch_wait_s=0) as batcher:
        long = await occupy(batcher, engine, GenerationRequest(["</s>", "long"], 8))  # held at step 0
        short = asyncio.create_task(batcher.generate(GenerationRequest(["</s>", "short"], 2)))
        _, short_call = await asyncio.to_thread(engine.wait_for_calls, 2)
        assert short_call.alone is False  # the long one is in the background lane
        short_call.release.set()
        assert (await short).text
        await long.release()
        await batcher.generate(GenerationRequest(["</s>", "again"], 2))
        assert engine.calls[2].alone is True  # nothing else in flight
