"""The benchmark's pieces, fast: baselines answer like ferry, the driver counts what the server
saw, the ceiling rebuilds ferry's batch sizes from its histogram, the locustfile's classes are
locust users, and a short headless locust run against a tiny-model ferry has no failures.

Locust monkey-patches the process with gevent when imported, so it only runs in subprocesses.
"""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest import report
from loadtest.bench_results import Row
from loadtest.ceiling import batch_sizes_between, histogram_snapshot, simulated_ceiling
from loadtest.driver import drive, generate_body, percentile
from loadtest.harness import Server, start_baseline
from predictor.engine import LatencyModel
from tests.conftest import REFERENCE_PROMPT, ROOT, FerryProcess, ensure_tiny_model

BODY = {"text": REFERENCE_PROMPT, "max_new_tokens": 10}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    log_dir = tmp_path_factory.mktemp("baselines")
    model = ensure_tiny_model()
    servers: dict[str, Server] = {}
    try:
        for name, module in (
            ("naive", "loadtest.baselines.naive"),
            ("timer", "loadtest.baselines.timer_batcher"),
        ):
            servers[name] = start_baseline(
                name, module, log_dir=log_dir, model_dir=model, engine="ctranslate2",
                inter_threads=1, intra_threads=1,
            )  # fmt: skip
        for server in servers.values():
            server.wait_ready(60)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def test_baselines_answer_the_generate_body_like_ferry(
    baselines: dict[str, Server], ferry: FerryProcess
) -> None:
    expected = httpx.post(f"{ferry.url}/generate", json=BODY, timeout=30).json()
    assert expected["generated_tokens"] == 10
    for name, server in baselines.items():
        response = httpx.post(f"{server.url}/generate", json=BODY, timeout=30)
        assert response.status_code == 200, name
        assert response.json() == expected, name  # same engine, greedy: the same text
        bad = httpx.post(f"{server.url}/generate", json={"text": 3}, timeout=30)
        assert bad.status_code == 422, name


def test_timer_batcher_batches_and_naive_does_not(baselines: dict[str, Server]) -> None:
    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(*(client.post(url, json=BODY) for _ in range(6)))
        return [r.status_code for r in responses]

    for name, server in baselines.items():
        before = httpx.get(f"{server.url}/stats").json()
        assert asyncio.run(burst(f"{server.url}/generate")) == [200] * 6
        after = httpx.get(f"{server.url}/stats").json()
        assert after["requests"] - before["requests"] == 6
        batches = after["batches"] - before["batches"]
        if name == "naive":
            assert batches == 6
        else:
            assert batches < 6  # six requests inside one 100 ms window share batches


def test_driver_counts_every_request_the_server_answered(baselines: dict[str, Server]) -> None:
    server = baselines["naive"]
    before = httpx.get(f"{server.url}/stats").json()["requests"]
    result = asyncio.run(
        drive(
            f"{server.url}/generate",
            generate_body(REFERENCE_PROMPT, 4),
            users=3,
            duration_s=1.0,
            warmup_s=0.3,
        )
    )
    after = httpx.get(f"{server.url}/stats").json()["requests"]
    assert result.failed == 0 and result.completed > 0
    assert result.completed <= result.ok_total <= result.sent_total
    # Every answered request was computed by the server; at most one per user was cut short
    # at the end (sent, computed, but its answer not awaited).
    assert result.ok_total <= after - before <= result.sent_total
    assert result.sent_total - result.ok_total <= 3
    assert 0 < result.p(50) <= result.p(99)
    # The rate counts the window's answers over the span between the answers at its edges.
    assert result.rate_answers == result.completed
    assert result.rps == pytest.approx(result.completed / result.rate_span_s)
    assert result.rate_span_s == pytest.approx(result.window_s, abs=1.0)


def test_the_rate_counts_whole_bursts_whatever_the_window_phase() -> None:
    from loadtest.driver import answer_aligned_rate

    # 50 answers every 0.45 s (a batch of 50 at a time), a few ms apart within a burst.
    answers = sorted(0.45 * k + 0.0001 * i for k in range(1, 60) for i in range(50))
    rates, counts = set(), set()
    for phase in range(45):
        start = 2.0 + phase / 100
        if any(min(edge % 0.45, 0.45 - edge % 0.45) < 0.006 for edge in (start, start + 10.0)):
            continue  # an edge inside a burst's 5 ms: off by part of that burst (not whole ones)
        n, span = answer_aligned_rate(answers, start, start + 10.0)
        rates.add(round(n / span, 6))
        counts.add(n)
    assert rates == {round(50 / 0.45, 6)}  # 111.1 req/s at every phase
    assert counts == {1100, 1150}  # what a fixed 10 s window counts: 110 or 115 req/s
    # Answers spread evenly: the plain count over the window.
    even = [0.01 * k for k in range(1, 2001)]
    n, span = answer_aligned_rate(even, 3.005, 13.005)
    assert n == 1000 and n / span == pytest.approx(100.0)
    assert answer_aligned_rate([1.0], 2.0, 3.0) == (0, 0.0)  # no answer inside the window


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0


def _histogram(sizes: list[int]) -> str:
    edges = [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 50]
    lines = ["# TYPE ferry_batch_size histogram"]
    for edge in edges:
        cum = sum(1 for n in sizes if n <= edge)
        lines.append(f'ferry_batch_size_bucket{{le="{float(edge)}"}} {float(cum)}')
    lines.append(f'ferry_batch_size_bucket{{le="+Inf"}} {float(len(sizes))}')
    lines.append(f"ferry_batch_size_count {float(len(sizes))}")
    lines.append(f"ferry_batch_size_sum {float(sum(sizes))}")
    return "\n".join(lines) + "\n"


def test_batch_sizes_are_rebuilt_from_the_histogram() -> None:
    earlier = [1, 40]
    formed = [1, 1, 3, 20, 20, 19, 39, 40, 12]
    before = histogram_snapshot(_histogram(earlier))
    after = histogram_snapshot(_histogram(earlier + formed))
    sizes = batch_sizes_between(before, after)
    assert len(sizes) == len(formed)
    assert sum(sizes) == sum(formed)
    assert sorted(n for n in sizes if n <= 8) == [1, 1, 3]  # exact where buckets are exact
    assert sum(1 for n in sizes if 8 < n <= 16) == 1
    assert sum(1 for n in sizes if 16 < n <= 32) == 3
    assert sum(1 for n in sizes if 32 < n <= 50) == 2


def test_simulated_ceiling_is_the_latency_formula() -> None:
    latency = LatencyModel()
    ceiling = simulated_ceiling([40] * 10, max_new_tokens=10, latency=latency)
    assert ceiling.rps == pytest.approx(40 / latency.batch_seconds(40, 10))
    assert 1800 < ceiling.rps < 2000  # n / T(n, t) = 40 / 21 ms, about 1,905 requests/s


def test_capacity_advice_from_a_sweep() -> None:
    sweep = [
        Row("ferry", users, rps, p50_s=0.0, p95_s=0.0, p99_s=p99, completed=0, failed=0)
        for users, rps, p99 in (
            (1, 7.0, 0.15), (8, 60.0, 0.2), (32, 130.0, 0.3), (40, 138.0, 0.35), (64, 140.0, 0.55), (128, 141.0, 1.1),
        )
    ]  # fmt: skip
    advice = report.capacity_advice(sweep)
    assert advice is not None
    assert advice.knee_users == 32  # first point at >= 90 % of the best throughput
    assert advice.container_concurrency == 64  # p99 within 2x the knee's
    text = report.capacity_yaml(advice, "a test")
    assert "target: 32" in text and "containerConcurrency: 64" in text and 'threshold: "32"' in text


def test_locustfile_user_classes_are_locust_users() -> None:
    code = (
        "import json, locust, loadtest.locustfile as m\n"
        "print(json.dumps({c.__name__: issubclass(c, locust.User) for c in m.USER_CLASSES}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    classes = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(classes) == {
        "GenerateUser", "MixedGenerateUser", "V1User", "V2RestUser", "V2GrpcUser",
        "OpenAICompletionsUser",
    }  # fmt: skip
    assert all(classes.values())


def test_locust_headless_run_against_ferry_has_no_failures(
    ferry: FerryProcess, tmp_path: Path
) -> None:
    prefix = tmp_path / "locust"
    locust = Path(sys.executable).parent / "locust"
    argv = [
        str(locust), "-f", str(ROOT / "loadtest" / "locustfile.py"),
        "GenerateUser", "V1User", "V2RestUser", "V2GrpcUser",
        "--headless", "--host", ferry.url, "--grpc-target", ferry.grpc_target,
        "-u", "4", "-r", "4", "-t", "3s", "--stop-timeout", "5",
        "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
        "--max-new-tokens", "4",
    ]  # fmt: skip
    run = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    with Path(f"{prefix}_stats.csv").open() as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    assert "ModelInfer" in rows  # the gRPC user really ran
    assert Path(f"{prefix}.html").is_file()


def test_even_split_spreads_a_burst_over_the_slots() -> None:
    from loadtest.bench_measure import even_split

    assert even_split(40, 2, 50) == [20, 20]
    assert even_split(1, 2, 50) == [1]
    assert even_split(7, 2, 50) == [4, 3]
    assert even_split(128, 2, 50) == [43, 43, 42]  # no batch above max_batch_size


def test_wrk_output_is_read_from_its_latency_distribution() -> None:
    from loadtest.wrk import parse

    out = """  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    18.58ms    1.75ms  29.08ms   92.52%
    Req/Sec    53.50      5.87    60.00     62.50%
  Latency Distribution
     50%   18.13ms
     75%   18.20ms
     90%   18.73ms
     99%    1.20s
  107 requests in 2.00s, 25.71KB read
  Non-2xx or 3xx responses: 3
Requests/sec:     53.47
"""
    result = parse(out, users=1)
    assert (result.rps, result.p50_s, result.p99_s, result.requests, result.non_2xx) == (53.47, 0.01813, 1.2, 107, 3)


def _row(server: str, users: int, rps: float, **fields: object) -> Row:
    return Row(server, users, rps, p50_s=0.1, p95_s=0.2, p99_s=0.3, completed=10, failed=0, **fields)  # type: ignore[arg-type]


def test_summary_verdicts_and_json_from_typed_rows(tmp_path: Path) -> None:
    from loadtest.bench import config_from_args
    from loadtest.bench_results import Machine, Results
    from loadtest.bench_summary import summarize, verdicts, write_outputs

    cfg = config_from_args(["--levels", "1,40", "--servers", "ferry,naive,timer", "--out-dir", str(tmp_path)])
    results = Results(
        config={}, generator="test", machine=Machine(2, "cpu", "3.11", "4", (0.0, 0.0, 0.0)),
        sweep={
            "ferry": [_row("ferry", 1, 5.0, ceiling_rps=5.0), _row("ferry", 40, 100.0, ceiling_rps=100.0)],
            "naive": [_row("naive", 1, 4.0), _row("naive", 40, 10.0)],
            "timer": [_row("timer", 1, 2.0), _row("timer", 40, 50.0)],
        },
    )  # fmt: skip
    results.summary = summary = summarize(cfg, results)
    assert (summary.ferry_over_ceiling, summary.ferry_over_naive, summary.ferry_over_timer) == (1.0, 10.0, 2.0)
    assert summary.ferry_over_timer_by_users == {1: 2.5, 40: 2.0}
    assert summary.capacity is not None and summary.capacity.knee_users == 40
    assert verdicts(cfg, summary)[:2] == [
        "PASS  ferry / engine limit (its best configuration, same in flight) at 40 users = 1.00 (>= 0.95)",
        "PASS  ferry / naive at 40 users = 10.0 (>= 8)",
    ]
    write_outputs(cfg, results)
    written = json.loads((tmp_path / f"bench-{cfg.mode}.json").read_text())
    assert written["sweep"]["ferry"][1]["ceiling_rps"] == 100.0
    assert "sim_rps" not in written["summary"]  # not measured: left out, not null
    assert "| ferry (CTranslate2) | 100.0 |" in (tmp_path / f"bench-{cfg.mode}.md").read_text()


def test_one_user_latency_is_sampled_in_blocks_alternating_with_the_engine(
    ferry: FerryProcess, tmp_path: Path
) -> None:
    from loadtest.bench import config_from_args
    from loadtest.one_user import one_user_beside_engine

    cfg = config_from_args(["--model-dir", str(ensure_tiny_model()), "--out-dir", str(tmp_path)])
    pair = one_user_beside_engine(cfg, ferry.url + "/generate", blocks=3, per_block=4)
    # Each block's first sample is left out on both sides: 3 x (4 - 1) each.
    assert (pair.samples, pair.blocks, pair.per_block) == (9, 3, 4)
    assert 0 < pair.engine_p50_s < 5 and 0 < pair.server_p50_s < 5
    assert pair.ratio == pytest.approx(pair.server_p50_s / pair.engine_p50_s)


def test_the_one_user_verdict_judges_the_interleaved_pair(tmp_path: Path) -> None:
    from loadtest.bench import config_from_args
    from loadtest.bench_results import Machine, OneUserPair, Results
    from loadtest.bench_summary import summarize, verdicts

    cfg = config_from_args(["--levels", "1,40", "--servers", "ferry", "--out-dir", str(tmp_path)])
    results = Results(
        config={}, generator="test", machine=Machine(2, "cpu", "3.11", "4", (0.0, 0.0, 0.0)),
        sweep={"ferry": [_row("ferry", 1, 5.0)]},
        ferry_one_user=OneUserPair(0.153, 0.150, 0.153 / 0.150, 160, 40, 5),
    )  # fmt: skip
    summary = summarize(cfg, results)
    assert summary.ferry_p50_over_engine_single == pytest.approx(1.02)  # the pair's
    lines = verdicts(cfg, summary)
    assert any(line.startswith("PASS  ferry p50 at 1 user") and "153 ms / 150 ms" in line for line in lines)


def test_a_failed_one_user_measurement_is_recorded_and_the_bench_goes_on(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from loadtest.bench import config_from_args
    from loadtest.bench_results import Machine, Results
    from loadtest.bench_servers import measure_one_user

    cfg = config_from_args(["--model-dir", str(tmp_path / "no-model"), "--out-dir", str(tmp_path)])
    results = Results(config={}, generator="test", machine=Machine(2, "cpu", "3.11", "4", (0.0, 0.0, 0.0)), sweep={})
    server = SimpleNamespace(url="http://127.0.0.1:9")
    assert measure_one_user(cfg, server, results) is None  # type: ignore[arg-type]
    assert "batch-1 engine process" in results.failures["ferry-one-user"]
