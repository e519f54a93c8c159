"""Overload, deadlines, disconnects, engine faults and drain against the real server
(SimulatedEngine, so the timing is ours to set). Waits are on observable state, not sleeps."""

from __future__ import annotations

import asyncio
import signal
import threading

import httpx
import pytest

from tests.conftest import REFERENCE_PROMPT, FerryFactory, FerryProcess, scrape, wait_for_metric

SLOW = {"engine": "simulated", "sim_prefill_s": 1.5, "sim_step_s": 0.0, "sim_step_per_seq_s": 0.0}


def post_generate(ferry: FerryProcess, timeout: float = 30, **body: object) -> httpx.Response:
    payload = {"text": REFERENCE_PROMPT, "max_new_tokens": 2, **body}
    return httpx.post(f"{ferry.url}/generate", json=payload, timeout=timeout)


def in_background(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except Exception as exc:  # surfaced by the test's assertions
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_full_queue_answers_503_with_retry_after_at_once(ferry_factory: FerryFactory) -> None:
    ferry = ferry_factory(**SLOW, max_batch_size=1, max_queue_size=2, retry_after_s=3)
    threads = [in_background(post_generate, ferry)]
    wait_for_metric(ferry, "ferry_engine_slots_busy", lambda v: v == 1)
    threads += [in_background(post_generate, ferry) for _ in range(2)]
    wait_for_metric(ferry, "ferry_queue_depth", lambda v: v == 2)
    r = post_generate(ferry, timeout=1.0)  # answered at once, well inside the engine's 1.5 s
    assert r.status_code == 503
    assert r.headers["retry-after"] == "3"
    assert "queue is full" in r.json()["error"]
    assert scrape(ferry)['ferry_requests_rejected_total{reason="queue_full"}'] == 1
    for thread, result in threads:
        thread.join(30)
        assert result["value"].status_code == 200  # type: ignore[union-attr]


def test_connections_over_the_limit_get_503_with_retry_after_unparsed(ferry_factory: FerryFactory) -> None:
    ferry = ferry_factory(**SLOW, max_connections=16, retry_after_s=2)
    admitted = [in_background(post_generate, ferry) for _ in range(4)]
    wait_for_metric(ferry, "ferry_requests_in_flight", lambda v: v == 4)  # 4 connections open

    async def crowd() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as client:
            return await asyncio.gather(
                *(client.post(f"{ferry.url}/generate", json={"text": "x", "max_new_tokens": 1}) for _ in range(20))
            )

    crowd_responses = asyncio.run(crowd())
    # Admitted requests hold their connection for the engine's 1.5 s, so once 16 are open every
    # later one is refused: at most 12 of the crowd get in, at least 8 are turned away.
    statuses = [r.status_code for r in crowd_responses]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 8, statuses
    refused = [r for r in crowd_responses if r.status_code == 503]
    assert all(r.headers["retry-after"] == "2" and "too many open connections" in r.text for r in refused)
    for thread, result in admitted:
        thread.join(30)
        assert result["value"].status_code == 200  # type: ignore[union-attr]
    # uvicorn refused them before the app: ferry never admitted or counted them.
    ok = scrape(ferry)['ferry_requests_total{outcome="ok",protocol="generate"}']
    assert ok == 4 + statuses.count(200)


def test_deadline_in_queue_and_while_running_answer_504(ferry_factory: FerryFactory) -> None:
    ferry = ferry_factory(**SLOW, max_batch_size=1)
    # Alone, with a deadline shorter than the batch: it passes while running.
    r = post_generate(ferry, timeout_s=0.2)
    assert r.status_code == 504 and "running" in r.json()["error"]
    wait_for_metric(ferry, "ferry_engine_slots_busy", lambda v: v == 0)
    busy = in_background(post_generate, ferry)
    wait_for_metric(ferry, "ferry_engine_slots_busy", lambda v: v == 1)
    r = post_generate(ferry, timeout_s=0.2)
    assert r.status_code == 504 and "queued" in r.json()["error"]
    metrics = scrape(ferry)
    assert metrics['ferry_requests_timed_out_total{stage="running"}'] == 1
    assert metrics['ferry_requests_timed_out_total{stage="queued"}'] == 1
    busy[0].join(30)
    assert busy[1]["value"].status_code == 200  # type: ignore[union-attr]
    # The queued one was never computed: two batches ran (the 504'd-while-running one and `busy`).
    assert scrape(ferry)["ferry_batch_size_count"] == 2


def test_client_that_disconnects_while_queued_is_never_computed(ferry_factory: FerryFactory) -> None:
    ferry = ferry_factory(**{**SLOW, "sim_prefill_s": 3.0}, max_batch_size=8)
    busy = in_background(post_generate, ferry)
    wait_for_metric(ferry, "ferry_engine_slots_busy", lambda v: v == 1)

    async def connect_then_leave() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            tasks = [
                asyncio.create_task(client.post(f"{ferry.url}/generate", json={"text": "gone", "max_new_tokens": 2}))
                for _ in range(3)
            ]
            while scrape(ferry)["ferry_queue_depth"] < 3:  # all three admitted and waiting
                await asyncio.sleep(0.02)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(connect_then_leave())
    wait_for_metric(ferry, 'ferry_requests_cancelled_total{stage="queued"}', lambda v: v == 3)
    assert scrape(ferry)["ferry_queue_depth"] == 0
    busy[0].join(30)
    assert busy[1]["value"].status_code == 200  # type: ignore[union-attr]
    assert post_generate(ferry).status_code == 200
    metrics = scrape(ferry)
    # Two batches of one: `busy` and the last request. The three that left were never computed.
    assert metrics["ferry_batch_size_count"] == 2 and metrics["ferry_batch_size_sum"] == 2


def test_engine_fault_fails_only_its_batch(ferry_factory: FerryFactory) -> None:
    ferry = ferry_factory(engine="simulated", sim_fail_every=2, sim_prefill_s=0.0)
    statuses = []
    for _ in range(6):
        r = post_generate(ferry)
        statuses.append(r.status_code)
        if r.status_code == 500:
            # A generic answer with the error id of the one log line that holds the detail.
            message = r.json()["error"]
            assert "engine failed" in message and "injected fault" not in message
            error_id = message.split("error id ", 1)[1].split(")", 1)[0]
            assert ferry.log().count(error_id) == 1 and "injected fault" in ferry.log()
    assert statuses == [200, 500, 200, 500, 200, 500]
    assert scrape(ferry)["ferry_engine_failures_total"] == 3
    assert httpx.get(f"{ferry.url}/v2/models/{ferry.model_name}/ready").status_code == 200


def test_sigterm_drains_admitted_work_then_exits_zero(ferry_factory: FerryFactory) -> None:
    ferry = ferry_factory(**{**SLOW, "sim_prefill_s": 1.0}, max_batch_size=2, drain_grace_s=20)
    pending = [in_background(post_generate, ferry) for _ in range(5)]
    wait_for_metric(ferry, "ferry_requests_in_flight", lambda v: v == 5)
    ferry.process.send_signal(signal.SIGTERM)
    ready = f"{ferry.url}/v2/models/{ferry.model_name}/ready"
    deadline_checks = 0
    while httpx.get(ready, timeout=5).status_code != 503:  # not ready at once (first poll or two)
        deadline_checks += 1
        assert deadline_checks < 100
    refused = post_generate(ferry, timeout=5)
    assert refused.status_code == 503 and "retry-after" in refused.headers
    for thread, result in pending:
        thread.join(30)
        assert "error" not in result, result
        assert result["value"].status_code == 200  # type: ignore[union-attr]
    assert ferry.process.wait(timeout=30) == 0
    assert "drained: every admitted request was answered" in ferry.log()


@pytest.mark.parametrize("protocol", ["generate", "v1"])
def test_too_many_instances_and_huge_bodies_are_4xx(ferry: FerryProcess, protocol: str) -> None:
    if protocol == "v1":
        r = httpx.post(
            f"{ferry.url}/v1/models/{ferry.model_name}:predict", json={"instances": ["a"] * 65}, timeout=30
        )
        assert r.status_code == 400 and "limit is 64" in r.json()["error"]
    big = {"text": "a" * 2_000_000}
    r = httpx.post(f"{ferry.url}/generate", json=big, timeout=30)
    assert r.status_code == 413 and "limit of 1048576 bytes" in r.json()["error"]
