"""The background lane: long generations run on idle-priority generators (CPU) and never hold
short requests hostage; streams, stop strings and short requests stay interactive."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from predictor.batcher import GenerationRequest
from predictor.engine import Collect, CTranslate2Engine, EngineItem, LatencyModel, Sampling, SimulatedEngine, ThreadPlan
from predictor.engine.threads import at_idle_priority, idle_priority_supported
from tests.conftest import ensure_tiny_model
from tests.helpers import running_batcher

PROMPT = ["</s>", "ĠHello", "ĠWorld"]
needs_idle = pytest.mark.skipif(not idle_priority_supported(), reason="SCHED_IDLE is Linux-only")


def idle_threads() -> set[int]:
    """Native ids of this process's threads running SCHED_IDLE."""
    tids = {int(tid) for tid in os.listdir("/proc/self/task")}
    idle = set()
    for tid in tids:
        try:
            if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                idle.add(tid)
        except OSError:  # the thread ended meanwhile
            pass
    return idle


def test_thread_plan_has_a_background_lane_on_cpu_only() -> None:
    assert ThreadPlan.choose("cpu", None, None, 2).background == idle_priority_supported()
    assert not ThreadPlan.choose("cpu", None, None, 2, background=False).background
    assert not ThreadPlan.choose("cuda", None, None, 16).background


@needs_idle
def test_at_idle_priority_returns_and_leaves_the_caller_alone() -> None:
    assert at_idle_priority(lambda: os.sched_getscheduler(0)) == os.SCHED_IDLE
    assert os.sched_getscheduler(0) != os.SCHED_IDLE
    with pytest.raises(ZeroDivisionError):
        at_idle_priority(lambda: 1 // 0)


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return ensure_tiny_model()


@needs_idle
def test_background_generators_run_at_idle_priority_and_answer_the_same(tiny_model: Path) -> None:
    before = idle_threads()
    engine = CTranslate2Engine(tiny_model, name="tiny", device="cpu", compute_type="int8")
    try:
        assert engine.background_concurrency == engine.plan.slots
        assert engine.info.background_slots == engine.plan.slots
        # CTranslate2 starts each generator's worker threads in its constructor: the background
        # generators' workers inherited SCHED_IDLE, the interactive ones did not.
        assert len(idle_threads() - before) >= engine.plan.slots
        answers = {}
        for background in (False, True):
            items = [EngineItem(list(PROMPT), 12, ignore_eos=True), EngineItem(list(PROMPT[:2]), 5, ignore_eos=True)]
            collect = Collect(len(items))
            engine.generate(items, Sampling(), collect, False, background)
            answers[background] = [(o.tokens, o.finish_reason) for o in collect.outputs if o is not None]
        # A background call runs without per-step callbacks; the shorter sequence is still cut
        # at its own count.
        assert answers[True] == answers[False]
        assert [len(tokens) for tokens, _ in answers[True]] == [12, 5]
    finally:
        engine.close()


def test_no_background_generators_when_switched_off(tiny_model: Path) -> None:
    before = idle_threads()
    engine = CTranslate2Engine(tiny_model, name="tiny", device="cpu", compute_type="int8", background=False)
    try:
        assert engine.background_concurrency == 0
        assert idle_threads() - before == set()
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
