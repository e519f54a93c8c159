"""`make bench` / `make bench-quick`: ferry beside the engine ceiling and the write-up's servers.

One run, one machine, one model directory, the same CTranslate2 settings for everyone, one load
generator (loadtest/driver.py, closed loop):

1. ferry on CTranslate2 with its own defaults (thread plan `auto`), and after each of its
   measurements the engine's limit at the same requests in flight: CTranslate2 called directly
   with perfectly formed batches in the best of its configurations (loadtest/engine_limit.py),
   independent of the batches ferry formed (a replay of those is kept as a diagnostic only);
2. the naive FastAPI server (engine on the event loop, one request per call);
3. the timer batcher (FastAPI + background task, max batch 50, fixed 100 ms wait);
4. ferry with SimulatedEngine at GPU-class speed, beside that engine's formula ceiling and
   KServe's floor (a model that answers at once on KServe's ModelServer), measured with wrk:
   the closed-loop limit at n users is L = n / (T(n, t) + n / floor).

Each server is measured at every concurrency of the sweep; the reference concurrency (40) is
measured `reps` times and reported as the median. Everything runs on 127.0.0.1 in subprocesses
that are stopped at the end, whatever happens. Results: bench-results/bench-<mode>.{json,md};
plots: docs/ (full mode) or bench-results/ (quick mode).

Quick mode takes about 2.5 minutes; full mode 15-20 (bounded: every warm-up, window and
ceiling replay has a cap; see --help for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest import report, wrk
from loadtest.ceiling import (
    batch_sizes_between,
    histogram_snapshot,
    metric_value,
    simulated_engine_ceiling,
)
from loadtest.driver import (
    GENERATOR_NAME,
    BodyFactory,
    DriveResult,
    drive,
    generate_body,
    install_fast_loop,
    mixed_generate_body,
    openai_stream_body,
    percentile,
)
from loadtest.procs import ROOT, Server, http_get, start_baseline, start_ferry, start_kserve_floor
from predictor.engine import LatencyModel
from predictor.settings import Settings

REFERENCE_PROMPT = "Hello World, what is your name dog?"
FULL_LEVELS = [1, 2, 4, 8, 16, 32, 40, 64, 128]
QUICK_LEVELS = [1, 40]
SIM_TARGET_RPS = 404.0  # the write-up's Rust server


DEFAULT_GATHER_CAP_S = float(Settings.model_fields["max_batch_wait_s"].default)


@dataclass
class BenchConfig:
    mode: str
    model_dir: Path
    levels: list[int]
    warmup_s: float
    measure_s: float
    reps: int
    max_warmup_s: float
    out_dir: Path
    plots_dir: Path
    inter_threads: int = 2  # the baselines' CTranslate2 threads (ferry uses its own `auto` plan)
    intra_threads: int = 1
    compute_type: str = "auto"
    max_batch_size: int = 50
    ferry_wait_s: float = DEFAULT_GATHER_CAP_S  # ferry as shipped: adaptive gathering on
    reference_users: int = 40
    prompt: str = REFERENCE_PROMPT
    max_new_tokens: int = 10
    servers: list[str] = field(default_factory=lambda: ["ferry", "naive", "timer", "ferry-sim"])
    wait_variant_s: float = 0.0  # "ferry-no-gather": FERRY_MAX_BATCH_WAIT_S=0, at 1 and 40 users
    protocols: bool = False  # also V1 and V2 REST at the reference concurrency
    locust: bool = False  # also the write-up's own tool against ferry at the reference
    mixed: bool = False  # also 80 % 10-token / 20 % 100-token requests (ferry and timer batcher)
    streaming: bool = False  # also half streamed OpenAI completions, half /generate (ferry)

    def repetitions(self, users: int) -> int:
        return self.reps if users == self.reference_users else 1


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- one measurement ------------------------------------------------------------------


class Snapshots:
    """Server CPU, /metrics or /stats at the two edges of the measurement window."""

    def __init__(self, server: Server, metrics_path: str | None, stats_path: str | None) -> None:
        self.server = server
        self.metrics_path = metrics_path
        self.stats_path = stats_path
        self.cpu: list[float] = []
        self.metrics: list[str] = []
        self.stats: list[dict[str, Any]] = []

    async def take(self) -> None:
        self.cpu.append(self.server.cpu_seconds())
        if self.metrics_path:
            _, body = await asyncio.to_thread(http_get, self.server.url + self.metrics_path)
            self.metrics.append(body.decode())
        if self.stats_path:
            _, body = await asyncio.to_thread(http_get, self.server.url + self.stats_path)
            self.stats.append(json.loads(body))


def measure(
    cfg: BenchConfig,
    server: Server,
    *,
    label: str,
    users: int,
    path: str = "/generate",
    body: BodyFactory | bytes | None = None,
    metrics_path: str | None = None,
    stats_path: str | None = None,
    stream_path: str | None = None,
    stream_body: bytes | None = None,
) -> tuple[dict[str, Any], Snapshots]:
    snaps = Snapshots(server, metrics_path, stats_path)
    result: DriveResult = asyncio.run(
        drive(
            server.url + path,
            body if body is not None else generate_body(cfg.prompt, cfg.max_new_tokens),
            users=users,
            duration_s=cfg.measure_s,
            warmup_s=cfg.warmup_s,
            max_warmup_s=cfg.max_warmup_s,
            on_measure_start=snaps.take,
            on_measure_end=snaps.take,
            min_cycles=3.0,
            max_duration_s=1.5 * cfg.measure_s,
            stream_url=server.url + stream_path if stream_path else None,
            stream_body=stream_body,
        )
    )
    cpu = snaps.cpu[1] - snaps.cpu[0]
    row: dict[str, Any] = {
        "server": label,
        "users": users,
        "generator": "aiohttp",
        "rps": result.rps,
        "p50_s": result.p(50),
        "p95_s": result.p(95),
        "p99_s": result.p(99),
        "completed": result.completed,
        "failed": result.failed,
        "errors": result.errors,
        "window_s": result.window_s,
        "warmup_s": result.warmup_s,
        "cpu_s_per_request": cpu / result.completed if result.completed else 0.0,
        "server_cpu_share": cpu / result.window_s if result.window_s else 0.0,
        "client_cpu_share": result.client_cpu_share,
        "peak_rss_bytes": server.peak_rss_bytes(),
    }
    if len(result.latencies_by_body_s) > 1:  # mixed lengths: each kind's own percentiles
        row["p50_by_max_new_tokens"] = {
            str(_tokens_asked(body)): percentile(values, 50) for body, values in result.latencies_by_body_s.items()
        }
    if result.ttfts_s:
        row["streamed"] = len(result.ttfts_s)
        row["ttft_p50_s"] = percentile(result.ttfts_s, 50)
        row["ttft_p99_s"] = percentile(result.ttfts_s, 99)
    if len(snaps.stats) == 2:
        batches = snaps.stats[1]["batches"] - snaps.stats[0]["batches"]
        requests = snaps.stats[1]["requests"] - snaps.stats[0]["requests"]
        row["mean_batch_size"] = requests / batches if batches else 0.0
    log(
        f"{label:10s} users={users:<4d} {result.rps:8.1f} req/s  p50 {result.p(50) * 1000:7.1f} ms"
        f"  p99 {result.p(99) * 1000:7.1f} ms  failed {result.failed}"
        f"  server CPU {row['server_cpu_share']:.0%}  generator CPU {result.client_cpu_share:.0%}"
    )
    return row, snaps


def _tokens_asked(body: bytes) -> int:
    payload = json.loads(body)
    return int(payload.get("max_new_tokens", payload.get("max_tokens", 0)))


def ferry_batches(row: dict[str, Any], snaps: Snapshots) -> list[int]:
    """The batches ferry formed in the window, and its own engine time per batch."""
    before, after = snaps.metrics
    sizes = batch_sizes_between(histogram_snapshot(before), histogram_snapshot(after))
    row["batches"] = len(sizes)
    counts = collections.Counter(sizes)
    row["batch_size_counts"] = {str(n): counts[n] for n in sorted(counts)}
    row["mean_batch_size"] = sum(sizes) / len(sizes) if sizes else 0.0
    engine_s = metric_value(after, "ferry_batch_duration_seconds_sum") - metric_value(
        before, "ferry_batch_duration_seconds_sum"
    )
    row["ferry_mean_batch_seconds"] = engine_s / len(sizes) if sizes else 0.0
    return sizes


def even_split(users: int, slots: int, max_batch_size: int) -> list[int]:
    """`users` requests split as evenly as possible over `slots` batches (each <= max)."""
    parts = max(min(slots, users), -(-users // max_batch_size))
    return [users // parts + (1 if i < users % parts else 0) for i in range(parts)]


def run_engine_limit(cfg: BenchConfig, users: int) -> dict[str, Any]:
    """The independent yardstick, in its own process: CTranslate2 at its best at `users` in
    flight (loadtest/engine_limit.py)."""
    out = subprocess.run(
        [
            sys.executable, "-m", "loadtest.engine_limit",
            "--model-dir", str(cfg.model_dir),
            "--in-flight", str(users),
            "--prompt", cfg.prompt,
            "--max-new-tokens", str(cfg.max_new_tokens),
            "--compute-type", cfg.compute_type,
            "--time-cap", str(min(cfg.measure_s, 6.0)),
            "--single-runs", "9" if users == 1 else "0",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=cfg.measure_s * 8 + 120, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def ferry_thread_plan(server: Server) -> dict[str, int]:
    _, body = http_get(server.url + "/v2/models/opt-125m")
    parameters = json.loads(body).get("parameters", {})
    return {k: int(parameters.get(k, 0)) for k in ("slots", "threads_per_slot", "lone_batch_threads")}


def run_ceiling(
    cfg: BenchConfig,
    sizes: list[int],
    concurrency: int,
    single_runs: int,
    users: int,
    *,
    inter_threads: int | None = None,
    intra_threads: int | None = None,
) -> dict[str, Any]:
    """The ceiling subprocess; `users` bounds the requests in flight, as it bounded the server."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(sizes, f)
        sizes_file = f.name
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtest.ceiling",
                "--model-dir",
                str(cfg.model_dir),
                "--sizes",
                "@" + sizes_file,
                "--prompt",
                cfg.prompt,
                "--max-new-tokens",
                str(cfg.max_new_tokens),
                "--concurrency",
                str(concurrency),
                "--inter-threads",
                str(inter_threads or cfg.inter_threads),
                "--intra-threads",
                str(intra_threads or cfg.intra_threads),
                "--compute-type",
                cfg.compute_type,
                "--time-cap",
                str(cfg.measure_s),
                "--single-runs",
                str(single_runs),
                "--max-in-flight",
                str(users),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=cfg.measure_s * 6 + 120,
            check=True,
        )
    finally:
        os.unlink(sizes_file)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---- each server ------------------------------------------------------------------------


def bench_ferry(
    cfg: BenchConfig,
    log_dir: Path,
    results: dict[str, Any],
    *,
    label: str = "ferry",
    wait_s: float | None = None,
    levels: list[int] | None = None,
    extras: bool = True,
) -> None:
    wait_s = cfg.ferry_wait_s if wait_s is None else wait_s
    settings = {  # ferry's own defaults otherwise: the thread plan is `auto`
        "model_dir": cfg.model_dir,
        "compute_type": cfg.compute_type,
        "max_batch_size": cfg.max_batch_size,
        "max_batch_wait_s": wait_s,
        "max_queue_size": 1024,
    }
    server = start_ferry(label, log_dir=log_dir, settings=settings)
    try:
        server.wait_ready()
        plan = ferry_thread_plan(server)
        results.setdefault("ferry_thread_plan", plan)
        slots = plan["slots"] or 1
        for users in levels or cfg.levels:
            for rep in range(cfg.repetitions(users)):
                row, snaps = measure(cfg, server, label=label, users=users, metrics_path="/metrics")
                row["rep"] = rep
                sizes = ferry_batches(row, snaps)
                limit = run_engine_limit(cfg, users)
                row["ceiling"] = limit
                row["ceiling_rps"] = limit["rps"]
                row["ceiling_config"] = limit["best_config"]
                if limit.get("single_latency_s"):
                    row["engine_single_latency_s"] = limit["single_latency_s"]
                configs = ", ".join(f"{c['config']}: {c['rps']:.1f}" for c in limit["configs"])
                log(
                    f"{'ceiling':10s} users={users:<4d} {limit['rps']:8.1f} req/s (best of {configs})"
                    f"  {label}/ceiling {report.ratio(row['rps'], limit['rps']):.2f}"
                )
                log(f"{'':10s} batch sizes formed (size: count): {row.get('batch_size_counts', {})}")
                if sizes and users == cfg.reference_users and rep == 0 and label == "ferry":
                    # Diagnostic only (never a ratio's denominator): ferry's own batches replayed
                    # on one generator with its slots and threads.
                    replay = run_ceiling(
                        cfg, sizes, min(slots, users), single_runs=1, users=users,
                        inter_threads=slots, intra_threads=plan["threads_per_slot"] or 1,
                    )  # fmt: skip
                    row["replay_rps"] = replay["rps"]
                    log(f"{'replay':10s} users={users:<4d} {replay['rps']:8.1f} req/s (ferry's own batches)")
                results["sweep"].setdefault(label, []).append(row)
        if cfg.protocols and extras:
            name = "opt-125m"
            v1 = json.dumps(
                {"instances": [{"text": cfg.prompt, "max_new_tokens": cfg.max_new_tokens}]}
            ).encode()
            v2 = json.dumps(
                {
                    "inputs": [
                        {"name": "text", "shape": [1], "datatype": "BYTES", "data": [cfg.prompt]},
                        {"name": "max_new_tokens", "shape": [1], "datatype": "INT32",
                         "data": [cfg.max_new_tokens]},
                    ]
                }
            ).encode()  # fmt: skip
            for protocol_label, path, body in (
                ("ferry-v1", f"/v1/models/{name}:predict", v1),
                ("ferry-v2", f"/v2/models/{name}/infer", v2),
            ):
                row, snaps = measure(
                    cfg,
                    server,
                    label=protocol_label,
                    users=cfg.reference_users,
                    path=path,
                    body=body,
                    metrics_path="/metrics",
                )
                ferry_batches(row, snaps)
                results["extra"].append(row)
        if cfg.mixed and extras:
            results["extra"].append(measure_mixed(cfg, server, "ferry-mixed", "/metrics"))
        if cfg.streaming and extras:
            results["extra"].append(measure_streaming(cfg, server, slots))
        if cfg.locust and extras:
            results["extra"].append(run_locust(cfg, server, log_dir))
    finally:
        server.stop(timeout_s=15)
        log(f"{label} stopped (log: {server.log_path})")


def bench_sim(cfg: BenchConfig, log_dir: Path, results: dict[str, Any]) -> None:
    latency = LatencyModel()
    settings = {
        "engine": "simulated",
        "max_batch_size": cfg.max_batch_size,
        "max_batch_wait_s": cfg.ferry_wait_s,
        "max_queue_size": 1024,
        "sim_prefill_s": latency.prefill_s,
        "sim_step_s": latency.step_s,
        "sim_step_per_seq_s": latency.step_per_seq_s,
        "sim_concurrency": 1,
    }
    server = start_ferry("ferry-sim", log_dir=log_dir, settings=settings)
    try:
        server.wait_ready()
        for users in cfg.levels:
            for rep in range(cfg.repetitions(users)):
                row, snaps = measure(
                    cfg, server, label="ferry-sim", users=users, metrics_path="/metrics"
                )
                row["rep"] = rep
                sizes = ferry_batches(row, snaps)
                if sizes:
                    ceiling = simulated_engine_ceiling(
                        sizes,
                        prompt=cfg.prompt,
                        max_new_tokens=cfg.max_new_tokens,
                        latency=latency,
                        concurrency=1,
                        max_in_flight=users,
                        time_cap_s=min(cfg.measure_s, 4.0),
                    )
                    row["ceiling"] = ceiling
                    row["ceiling_rps"] = ceiling["rps"]
                results["sweep"]["ferry-sim"].append(row)
        results["gpu_speed"] = gpu_speed(cfg, server, latency, log_dir)
    finally:
        server.stop(timeout_s=15)
        log("ferry-sim stopped")


def gpu_speed(cfg: BenchConfig, server: Server, latency: LatencyModel, log_dir: Path) -> dict[str, Any]:
    """ferry + SimulatedEngine measured with wrk (a light generator), beside the formula
    ceiling n / T(n, t) and KServe's floor (an instant model on KServe's ModelServer, V1)."""
    n, t = cfg.reference_users, cfg.max_new_tokens
    duration = max(cfg.measure_s, 8.0)
    generate = generate_body(cfg.prompt, t)
    v1 = json.dumps({"instances": [json.loads(generate)]}).encode()
    v1_path = "/v1/models/opt-125m:predict"
    out: dict[str, Any] = {"users": n, "T_n_s": latency.batch_seconds(n, t), "T_1_s": latency.batch_seconds(1, t)}
    out["formula_rps"] = n / out["T_n_s"]
    gen = wrk.run(server.url + "/generate", generate, users=n, duration_s=duration)
    one = wrk.run(server.url + "/generate", generate, users=1, duration_s=duration)
    v1_row = wrk.run(server.url + v1_path, v1, users=n, duration_s=duration)
    floor_server = start_kserve_floor(log_dir)
    try:
        floor_server.wait_ready()
        floor = wrk.run(floor_server.url + v1_path, v1, users=n, duration_s=duration)
    finally:
        floor_server.stop(timeout_s=5)
    out.update(
        generate_rps=gen.rps, generate_p50_s=gen.p50_s, generate_non_2xx=gen.non_2xx,
        v1_rps=v1_row.rps, v1_non_2xx=v1_row.non_2xx,
        one_user_p50_s=one.p50_s, floor_rps=floor.rps,
    )  # fmt: skip
    out["L_rps"] = n / (out["T_n_s"] + n / floor.rps)
    out["generate_over_formula"] = gen.rps / out["formula_rps"]
    out["v1_over_L"] = v1_row.rps / out["L_rps"]
    out["one_user_p50_over_T1"] = one.p50_s / out["T_1_s"]
    log(
        f"{'gpu-speed':10s} wrk: /generate {gen.rps:.0f} req/s = {out['generate_over_formula']:.2f} x"
        f" {out['formula_rps']:.0f} (n / T(n, t)); V1 {v1_row.rps:.0f} = {out['v1_over_L']:.2f} x L"
        f" {out['L_rps']:.0f} (KServe floor {floor.rps:.0f}); 1-user p50 {one.p50_s * 1000:.1f} ms ="
        f" {out['one_user_p50_over_T1']:.3f} x T(1, t) {out['T_1_s'] * 1000:.1f} ms"
    )
    return out


def bench_baseline(cfg: BenchConfig, name: str, log_dir: Path, results: dict[str, Any]) -> None:
    module = {"naive": "loadtest.baselines.naive", "timer": "loadtest.baselines.timer_batcher"}[
        name
    ]
    server = start_baseline(
        name,
        module,
        log_dir=log_dir,
        model_dir=cfg.model_dir,
        engine="ctranslate2",
        inter_threads=cfg.inter_threads,
        intra_threads=cfg.intra_threads,
        compute_type=cfg.compute_type,
    )
    try:
        server.wait_ready()
        # The naive server computes on its event loop, so /stats would wait behind every queued
        # request; its batch size is 1 by construction (tests/test_loadtest.py checks it).
        stats_path = None if name == "naive" else "/stats"
        for users in cfg.levels:
            for rep in range(cfg.repetitions(users)):
                row, _ = measure(cfg, server, label=name, users=users, stats_path=stats_path)
                row["rep"] = rep
                if name == "naive":
                    row["mean_batch_size"] = 1.0
                results["sweep"][name].append(row)
        if cfg.mixed and name == "timer":
            results["extra"].append(measure_mixed(cfg, server, "timer-mixed", None))
    finally:
        server.stop(timeout_s=3)  # uvicorn would finish every queued request first
        log(f"{name} stopped")


def measure_streaming(cfg: BenchConfig, server: Server, slots: int) -> dict[str, Any]:
    """Half the users stream greedy OpenAI completions, half post /generate; the ceiling replays
    the batches ferry formed, and time to first token is the streamed users' first chunk."""
    label = "ferry-stream-mix"
    row, snaps = measure(
        cfg,
        server,
        label=label,
        users=cfg.reference_users,
        metrics_path="/metrics",
        stream_path="/openai/v1/completions",
        stream_body=openai_stream_body("opt-125m", cfg.prompt, cfg.max_new_tokens),
    )
    ferry_batches(row, snaps)
    ceiling = run_engine_limit(cfg, cfg.reference_users)
    if ceiling:
        row["ceiling_rps"] = ceiling["rps"]
        log(
            f"{'ceiling':10s} users={cfg.reference_users:<4d} {ceiling['rps']:8.1f} req/s  {label}/ceiling"
            f" {report.ratio(row['rps'], ceiling['rps']):.2f}; TTFT p50 {row.get('ttft_p50_s', 0) * 1000:.0f} ms"
            f" p99 {row.get('ttft_p99_s', 0) * 1000:.0f} ms over {row.get('streamed', 0)} streams"
        )
    return row


def measure_mixed(
    cfg: BenchConfig, server: Server, label: str, metrics_path: str | None
) -> dict[str, Any]:
    """The mixed scenario: 80 % of requests want 10 new tokens, 20 % want 100."""
    body = mixed_generate_body(cfg.prompt, cfg.max_new_tokens, 100, 0.2)
    row, snaps = measure(
        cfg,
        server,
        label=label,
        users=cfg.reference_users,
        body=body,
        metrics_path=metrics_path,
        stats_path=None if metrics_path else "/stats",
    )
    if metrics_path:
        ferry_batches(row, snaps)
    return row


def run_locust(cfg: BenchConfig, server: Server, log_dir: Path) -> dict[str, Any]:
    """The write-up's own tool at the reference scenario (its figures are labelled as such)."""
    prefix = cfg.out_dir / f"locust-reference-{cfg.mode}"
    run_time = max(10, int(cfg.measure_s * 2))
    cmd = [
        str(Path(sys.executable).parent / "locust"),
        "-f", str(ROOT / "loadtest" / "locustfile.py"), "GenerateUser",
        "--headless", "--host", server.url,
        "-u", str(cfg.reference_users), "-r", str(cfg.reference_users),
        "-t", f"{run_time}s", "--stop-timeout", "10",
        "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
        "--prompt", cfg.prompt, "--max-new-tokens", str(cfg.max_new_tokens),
    ]  # fmt: skip
    with (log_dir / "locust.log").open("wb") as out:
        subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=run_time + 60)
    stats = read_locust_stats(Path(f"{prefix}_stats.csv"))
    row = {"server": "ferry-locust", "users": cfg.reference_users, "generator": "locust", **stats}
    row["peak_rss_bytes"] = server.peak_rss_bytes()
    log(f"{'locust':10s} users={cfg.reference_users:<4d} {row['rps']:8.1f} req/s (whole run)")
    return row


def read_locust_stats(path: Path) -> dict[str, Any]:
    import csv

    with path.open() as f:
        for record in csv.DictReader(f):
            if record.get("Name") == "Aggregated":
                return {
                    "rps": float(record["Requests/s"]),
                    "p50_s": float(record["50%"]) / 1000,
                    "p95_s": float(record["95%"]) / 1000,
                    "p99_s": float(record["99%"]) / 1000,
                    "completed": int(record["Request Count"]),
                    "failed": int(record["Failure Count"]),
                }
    raise RuntimeError(f"no Aggregated row in {path}")


# ---- the whole run ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import ctranslate2

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "ctranslate2": ctranslate2.__version__,
        "loadavg_start": os.getloadavg(),
    }


def summarize(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    sweep = results["sweep"]
    ref = cfg.reference_users

    def at(server: str, users: int) -> list[dict[str, Any]]:
        return [r for r in sweep.get(server, []) if r["users"] == users]

    def med(server: str, users: int) -> dict[str, Any] | None:
        rows = at(server, users)
        return report.median_row(rows) if rows else None

    s: dict[str, Any] = {"reference_users": ref}
    ferry_ref = at("ferry", ref)
    if ferry_ref:
        s["ferry_over_ceiling"] = report.median_of(
            [report.ratio(r["rps"], r["ceiling_rps"]) for r in ferry_ref if r.get("ceiling_rps")]
        )
    replay = [r["replay_rps"] for r in ferry_ref if r.get("replay_rps")]
    if replay:
        s["replay_rps"] = replay[0]
    by_users = {
        users: report.ratio(f["rps"], t["rps"])
        for users in cfg.levels
        if (f := med("ferry", users)) and (t := med("timer", users))
    }
    if by_users:
        s["ferry_over_timer_by_users"] = by_users
        s["ferry_over_timer_min"] = min(by_users.values())
    for other in ("naive", "timer"):
        f, o = med("ferry", ref), med(other, ref)
        if f and o:
            s[f"ferry_over_{other}"] = report.ratio(f["rps"], o["rps"])
    f1, t1 = med("ferry", 1), med("timer", 1)
    if f1 and t1:
        s["ferry_over_timer_1_user"] = report.ratio(f1["rps"], t1["rps"])
        s["timer_over_ferry_p50_1_user"] = report.ratio(t1["p50_s"], f1["p50_s"])
    if f1 and f1.get("engine_single_latency_s"):
        s["ferry_p50_1_user_s"] = f1["p50_s"]
        s["engine_single_latency_s"] = f1["engine_single_latency_s"]
        s["ferry_p50_over_engine_single"] = report.ratio(f1["p50_s"], f1["engine_single_latency_s"])
    sim = med("ferry-sim", ref)
    if sim:
        s["sim_rps"] = sim["rps"]
        s["sim_over_ceiling"] = report.ratio(sim["rps"], sim.get("ceiling_rps") or 0.0)
    sim_ok = [
        r["users"]
        for users in cfg.levels
        if (r := med("ferry-sim", users))
        and report.ratio(r["rps"], r.get("ceiling_rps") or 0) >= 0.9
    ]
    s["sim_highest_users_at_0_9_ceiling"] = max(sim_ok) if sim_ok else None
    if results.get("gpu_speed"):
        s["gpu_speed"] = results["gpu_speed"]
    f_ref = med("ferry", ref)
    for row in results["extra"]:
        kinds = row.get("p50_by_max_new_tokens") or {}
        if row.get("server") == "ferry-mixed" and str(cfg.max_new_tokens) in kinds and f_ref:
            s["mixed_short_p50_s"] = kinds[str(cfg.max_new_tokens)]
            s["all_short_p50_s"] = f_ref["p50_s"]
            s["mixed_short_over_all_short_p50"] = report.ratio(kinds[str(cfg.max_new_tokens)], f_ref["p50_s"])
        if row.get("server") == "ferry-stream-mix" and row.get("ceiling_rps"):
            s["stream_mix_over_ceiling"] = report.ratio(row["rps"], row["ceiling_rps"])
            s["stream_ttft_p50_s"] = row.get("ttft_p50_s", 0.0)
            s["stream_ttft_p99_s"] = row.get("ttft_p99_s", 0.0)
    ferry_points = [m for users in cfg.levels if (m := med("ferry", users))]
    advice = report.capacity_advice(ferry_points) if len(ferry_points) >= 2 else None
    s["capacity"] = advice
    return s


def verdicts(cfg: BenchConfig, s: dict[str, Any]) -> list[str]:
    """One PASS/MISS line per target of the issue, with the figures behind it."""

    def line(ok: bool, text: str) -> str:
        return ("PASS  " if ok else "MISS  ") + text

    ref = s["reference_users"]
    lines = []
    if "ferry_over_ceiling" in s:
        v = s["ferry_over_ceiling"]
        lines.append(
            line(v >= 0.95, f"ferry / engine limit (its best configuration, same in flight) at {ref} users"
                 f" = {v:.2f} (>= 0.95)")
        )
    if "replay_rps" in s:
        replay = s["replay_rps"]
        lines.append(f"info  a replay of ferry's own batches: {replay:.1f} req/s (diagnostic, not a yardstick)")
    if "ferry_p50_over_engine_single" in s:
        v = s["ferry_p50_over_engine_single"]
        ferry_ms, engine_ms = s["ferry_p50_1_user_s"] * 1000, s["engine_single_latency_s"] * 1000
        ms = f"{ferry_ms:.0f} ms / {engine_ms:.0f} ms"
        lines.append(
            line(v <= 1.05, f"ferry p50 at 1 user / engine's best batch-1 latency = {v:.2f} ({ms}; <= 1.05)")
        )
    if "ferry_over_naive" in s:
        v = s["ferry_over_naive"]
        lines.append(line(v >= 8, f"ferry / naive at {ref} users = {v:.1f} (>= 8)"))
    if "ferry_over_timer" in s:
        v = s["ferry_over_timer"]
        lines.append(line(v > 1, f"ferry / timer batcher at {ref} users = {v:.2f} (> 1)"))
    if "ferry_over_timer_1_user" in s:
        v = s["ferry_over_timer_1_user"]
        p50 = s["timer_over_ferry_p50_1_user"]
        lines.append(
            line(v >= 1.6, f"ferry / timer batcher at 1 user = {v:.2f} (>= 1.6; timer p50 = {p50:.2f}x)")
        )
    if "ferry_over_timer_min" in s:
        v = s["ferry_over_timer_min"]
        each = ", ".join(f"{u}: {r:.2f}" for u, r in s["ferry_over_timer_by_users"].items())
        lines.append(line(v >= 1.0, f"ferry / timer batcher at every swept concurrency >= 1 (min {v:.2f}; {each})"))
    if "gpu_speed" in s:
        g = s["gpu_speed"]
        lines.append(
            line(g["generate_over_formula"] >= 0.8, f"GPU speed, wrk, {g['users']} users: /generate"
                 f" {g['generate_rps']:.0f}"
                 f" req/s = {g['generate_over_formula']:.2f} x n/T(n,t) {g['formula_rps']:.0f} (>= 0.8)")
        )  # fmt: skip
        lines.append(
            line(g["v1_over_L"] >= 0.9, f"GPU speed: V1 {g['v1_rps']:.0f} req/s = {g['v1_over_L']:.2f} x L"
                 f" {g['L_rps']:.0f}"
                 f" (KServe floor {g['floor_rps']:.0f} req/s; >= 0.9)")
        )  # fmt: skip
        lines.append(
            line(g["one_user_p50_over_T1"] <= 1.06, f"GPU speed: 1-user p50 {g['one_user_p50_s'] * 1000:.1f} ms ="
                 f" {g['one_user_p50_over_T1']:.3f} x T(1,t) {g['T_1_s'] * 1000:.1f} ms (<= 1.06)")
        )  # fmt: skip
    if "mixed_short_over_all_short_p50" in s:
        v = s["mixed_short_over_all_short_p50"]
        ms = f"{s['mixed_short_p50_s'] * 1000:.0f} ms vs {s['all_short_p50_s'] * 1000:.0f} ms"
        text = f"mixed lengths (80 % 10, 20 % 100 tokens): short p50 / all-short p50 = {v:.2f} ({ms}; <= 1.2)"
        lines.append(line(v <= 1.2, text))
    if "sim_rps" in s:
        v = s["sim_rps"]
        share = f"{s['sim_over_ceiling']:.2f} of its ceiling"
        target = f">= {SIM_TARGET_RPS:.0f}"
        lines.append(
            line(v >= SIM_TARGET_RPS, f"ferry + SimulatedEngine at {ref} users = {v:.0f} req/s"
                 f" ({target}; {share})")
        )  # fmt: skip
        lines.append(
            "      highest swept concurrency with ferry + SimulatedEngine >= 0.9 x its ceiling: "
            f"{s['sim_highest_users_at_0_9_ceiling']}"
        )
    if "stream_mix_over_ceiling" in s:
        v = s["stream_mix_over_ceiling"]
        ttft = f"TTFT p50 {s['stream_ttft_p50_s'] * 1000:.0f} ms, p99 {s['stream_ttft_p99_s'] * 1000:.0f} ms"
        lines.append(
            line(v >= 0.9, f"streamed (OpenAI) + plain mix at {ref} users / ceiling = {v:.2f} (>= 0.9; {ttft})")
        )
    return lines


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), CTranslate2 {m['ctranslate2']},"
        f" load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end."
    )


def write_outputs(cfg: BenchConfig, results: dict[str, Any]) -> None:
    s = results["summary"]
    ref_rows = []
    for server in cfg.servers:
        rows = [r for r in results["sweep"].get(server, []) if r["users"] == cfg.reference_users]
        if rows:
            ref_rows.append(report.median_row(rows))
    ref_rows.extend(results["extra"])
    one_user = [
        report.median_row(rows)
        for server in cfg.servers
        if (rows := [r for r in results["sweep"].get(server, []) if r["users"] == 1])
    ]
    body = {"text": cfg.prompt, "max_new_tokens": cfg.max_new_tokens}
    md = [
        f"# ferry benchmark ({cfg.mode} mode)",
        "",
        machine_line(results["machine"]),
        f"Model: `{cfg.model_dir}`, compute type {cfg.compute_type}; ferry with its own thread plan"
        f" {results.get('ferry_thread_plan', {})}; the baselines with inter_threads {cfg.inter_threads},"
        f" intra_threads {cfg.intra_threads}; the engine limit in its best configuration at each"
        f" concurrency; max batch {cfg.max_batch_size}; ferry max_batch_wait_s {cfg.ferry_wait_s}.",
        f"Request: `POST /generate {json.dumps(body)}`.",
        f"Load generator: {GENERATOR_NAME} unless the row says locust;"
        f" warm-up >= {cfg.warmup_s:g} s, window {cfg.measure_s:g} s;"
        f" reference rows are the median of {cfg.reps} run(s).",
        "",
        f"## Reference: {cfg.reference_users} users",
        "",
        report.markdown_table(ref_rows),
        "",
        "## Idle: 1 user",
        "",
        report.markdown_table(one_user),
        "",
        "## Verdicts",
        "",
        "```",
        *verdicts(cfg, s),
        "```",
        "",
        "## Concurrency sweep",
        "",
        report.sweep_table(results["sweep"]),
        "",
    ]
    if s.get("capacity"):
        md += ["## Capacity advice (Helm values)", "", "```yaml", s["capacity_yaml"], "```", ""]
    if results.get("plots"):
        md += ["Plots: " + ", ".join(results["plots"]), ""]
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / f"bench-{cfg.mode}.md").write_text("\n".join(md))
    (cfg.out_dir / f"bench-{cfg.mode}.json").write_text(json.dumps(results, indent=2, default=str))


def run(cfg: BenchConfig) -> dict[str, Any]:
    install_fast_loop()
    started = time.monotonic()
    log_dir = cfg.out_dir / f"logs-{cfg.mode}"
    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "generator": GENERATOR_NAME,
        "machine": machine(),
        "sweep": {name: [] for name in cfg.servers if name != "ferry-no-gather"},
        "extra": [],
    }
    runners: dict[str, Callable[[], None]] = {
        "ferry": lambda: bench_ferry(cfg, log_dir, results),
        "naive": lambda: bench_baseline(cfg, "naive", log_dir, results),
        "timer": lambda: bench_baseline(cfg, "timer", log_dir, results),
        "ferry-sim": lambda: bench_sim(cfg, log_dir, results),
        "ferry-no-gather": lambda: bench_ferry(
            cfg, log_dir, results, label="ferry-no-gather", wait_s=cfg.wait_variant_s,
            levels=sorted({1, cfg.reference_users}), extras=False,
        ),
    }  # fmt: skip
    try:
        for name in cfg.servers:
            log(f"--- {name} ---")
            try:
                runners[name]()
            except Exception as exc:  # one server's failure must not lose the others' figures
                log(f"{name} FAILED: {type(exc).__name__}: {exc}")
                results.setdefault("failures", {})[name] = f"{type(exc).__name__}: {exc}"
    finally:
        results["machine"]["loadavg_end"] = os.getloadavg()
        results["elapsed_s"] = time.monotonic() - started
        s = summarize(cfg, results)
        results["summary"] = s
        if s.get("capacity"):
            s["capacity_yaml"] = report.capacity_yaml(
                s["capacity"], f"the ferry sweep ({cfg.mode} mode, {os.cpu_count()} CPUs)"
            )
        if len(cfg.levels) > 2:
            from loadtest.plots import plot_sweep

            title = f"ferry vs baselines, OPT-125m-shaped int8, {os.cpu_count()} CPUs"
            title += f" ({GENERATOR_NAME})"
            results["plots"] = [str(p) for p in plot_sweep(results["sweep"], cfg.plots_dir, title)]
        write_outputs(cfg, results)
    print()
    print((cfg.out_dir / f"bench-{cfg.mode}.md").read_text())
    log(f"done in {results['elapsed_s']:.0f} s; results: {cfg.out_dir}/bench-{cfg.mode}.md, .json")
    return results


def config_from_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["quick", "full"], default="quick")
    parser.add_argument("--model-dir", type=Path, default=Path("models/opt-125m"))
    parser.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    parser.add_argument("--plots-dir", type=Path, default=None, help="default: docs/ in full mode")
    parser.add_argument("--levels", default=None, help="comma-separated users, e.g. 1,8,40")
    parser.add_argument(
        "--servers",
        default=None,
        help="default: ferry,naive,timer,ferry-sim (+ ferry-no-gather in full mode)",
    )
    parser.add_argument("--wait-variant", type=float, default=0.0, help="ferry-no-gather's cap, s")
    parser.add_argument("--warmup", type=float, default=None, help="seconds (at least)")
    parser.add_argument("--measure", type=float, default=None, help="measurement window, seconds")
    parser.add_argument("--reps", type=int, default=None, help="runs at the reference concurrency")
    parser.add_argument("--inter-threads", type=int, default=2)
    parser.add_argument("--intra-threads", type=int, default=1)
    parser.add_argument("--compute-type", default="auto")
    parser.add_argument(
        "--ferry-wait", type=float, default=DEFAULT_GATHER_CAP_S, help="FERRY_MAX_BATCH_WAIT_S (gathering cap)"
    )
    parser.add_argument("--prompt", default=REFERENCE_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    args = parser.parse_args(argv)
    full = args.mode == "full"
    default_servers = "ferry,naive,timer,ferry-sim" + (",ferry-no-gather" if full else "")
    servers = [s for s in (args.servers or default_servers).split(",") if s]
    levels = (
        [int(x) for x in args.levels.split(",")]
        if args.levels
        else (FULL_LEVELS if full else QUICK_LEVELS)
    )
    return BenchConfig(
        mode=args.mode,
        model_dir=args.model_dir,
        levels=levels,
        warmup_s=args.warmup if args.warmup is not None else (3.0 if full else 2.0),
        measure_s=args.measure if args.measure is not None else (10.0 if full else 6.0),
        reps=args.reps if args.reps is not None else (3 if full else 1),
        max_warmup_s=25.0 if full else 12.0,
        out_dir=args.out_dir,
        plots_dir=args.plots_dir or (Path("docs") if full else args.out_dir),
        inter_threads=args.inter_threads,
        intra_threads=args.intra_threads,
        compute_type=args.compute_type,
        ferry_wait_s=args.ferry_wait,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        servers=servers,
        wait_variant_s=args.wait_variant,
        protocols=full,
        locust=full,
        mixed=full,
        streaming=True,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_args(argv)
    if not (cfg.model_dir / "model.bin").is_file():
        sys.exit(f"bench: no model at {cfg.model_dir} (run `make models`)")
    run(cfg)


if __name__ == "__main__":
    main()
