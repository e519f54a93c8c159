"""`make bench`: each server measured over the sweep (ferry, the baselines, ferry at GPU speed
beside KServe's floor) and the extra rows (protocols, mixed lengths, streaming, locust)."""

from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from loadtest import report, wrk
from loadtest.bench_config import BenchConfig, log
from loadtest.bench_measure import REFERENCE_LOAD, Load, ferry_batches, ferry_thread_plan, measure, run_engine_limit
from loadtest.bench_results import GpuSpeed, OneUserPair, Results, Row
from loadtest.ceiling import simulated_ceiling
from loadtest.driver import BodyFactory, generate_body, mixed_generate_body, openai_stream_body
from loadtest.harness import ROOT, Server, start_baseline, start_ferry, start_kserve_floor
from loadtest.one_user import one_user_beside_engine
from predictor.engine import LatencyModel

MODEL_NAME = "opt-125m"
V1_PATH = f"/v1/models/{MODEL_NAME}:predict"


@contextlib.contextmanager
def running(server: Server, stop_timeout_s: float) -> Iterator[Server]:
    """A started server, ready; stopped on the way out, whatever happens."""
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop(timeout_s=stop_timeout_s)
        log(f"{server.name} stopped (log: {server.log_path})")


def sweep(cfg: BenchConfig, levels: list[int], measure_once: Callable[[int], Row], rows: list[Row]) -> None:
    """`measure_once(users)` at every level, `cfg.repetitions(users)` times, each row numbered and
    added to `rows` as soon as it is measured (a later failure keeps it)."""
    for users in levels:
        for rep in range(cfg.repetitions(users)):
            row = measure_once(users)
            row.rep = rep
            rows.append(row)


def measure_reference(
    cfg: BenchConfig,
    server: Server,
    label: str,
    load: Load = REFERENCE_LOAD,
    *,
    metrics_path: str | None = "/metrics",
    stats_path: str | None = None,
) -> Row:
    """One row at the reference concurrency; with ferry's /metrics, the batches it formed."""
    row, snaps = measure(
        cfg, server, label=label, users=cfg.reference_users, load=load, metrics_path=metrics_path, stats_path=stats_path
    )
    if metrics_path:
        ferry_batches(row, snaps)
    return row


# ---- ferry on CTranslate2 --------------------------------------------------------------------


def bench_ferry(
    cfg: BenchConfig,
    log_dir: Path,
    results: Results,
    *,
    label: str = "ferry",
    wait_s: float | None = None,
    levels: list[int] | None = None,
    extras: bool = True,
) -> None:
    settings: dict[str, object] = {  # ferry's own defaults otherwise: the thread plan is `auto`
        "model_dir": cfg.model_dir,
        "compute_type": cfg.compute_type,
        "max_batch_size": cfg.max_batch_size,
        "max_batch_wait_s": cfg.ferry_wait_s if wait_s is None else wait_s,
        "max_queue_size": 1024,
    }
    with running(start_ferry(label, log_dir=log_dir, settings=settings), stop_timeout_s=15) as server:
        if results.ferry_thread_plan is None:
            results.ferry_thread_plan = ferry_thread_plan(server)
        rows = results.sweep.setdefault(label, [])
        if label == "ferry" and 1 in cfg.levels:
            results.ferry_one_user = measure_one_user(cfg, server, results)
        sweep(cfg, levels or cfg.levels, lambda users: measure_beside_engine_limit(cfg, server, label, users), rows)
        if extras:
            ferry_extras(cfg, server, log_dir, results.extra)


def measure_one_user(cfg: BenchConfig, server: Server, results: Results) -> OneUserPair | None:
    """ferry at 1 user beside the engine's batch-1 calls, in alternating blocks; None (and the
    failure recorded) if it fails, so the sweep still runs."""
    try:
        # ~1.5 min in full mode; the two medians move ~2 % between runs of 40 blocks here.
        pair = one_user_beside_engine(cfg, server.url + "/generate", blocks=40 if cfg.mode == "full" else 16)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        log(f"ferry at 1 user beside the engine FAILED: {type(exc).__name__}: {exc}")
        results.failures["ferry-one-user"] = f"{type(exc).__name__}: {exc}"
        return None
    log(
        f"{'ferry':10s} users=1    p50 {pair.server_p50_s * 1000:.1f} ms beside the engine's batch-1 p50"
        f" {pair.engine_p50_s * 1000:.1f} ms ({pair.samples} each, {pair.blocks} alternating blocks): {pair.ratio:.3f}"
    )
    return pair


def measure_beside_engine_limit(cfg: BenchConfig, server: Server, label: str, users: int) -> Row:
    """ferry at `users`, then CTranslate2's own limit at the same requests in flight."""
    row, snaps = measure(cfg, server, label=label, users=users, metrics_path="/metrics")
    ferry_batches(row, snaps)
    limit = run_engine_limit(cfg, users)
    row.ceiling = limit
    row.ceiling_rps = limit.rps
    row.ceiling_config = limit.best_config
    configs = ", ".join(f"{c.config}: {c.rps:.1f}" for c in limit.configs)
    log(
        f"{'ceiling':10s} users={users:<4d} {limit.rps:8.1f} req/s (best of {configs})"
        f"  {label}/ceiling {report.ratio(row.rps, limit.rps):.2f}"
    )
    log(f"{'':10s} batch sizes formed (size: count): {row.batch_size_counts or {}}")
    return row


def ferry_extras(cfg: BenchConfig, server: Server, log_dir: Path, rows: list[Row]) -> None:
    """The rows the configuration asks for beside the sweep, added to `rows`: V1 and V2 REST,
    mixed lengths, streaming, locust."""
    if cfg.protocols:
        v1, v2 = protocol_bodies(cfg)
        rows.append(measure_reference(cfg, server, "ferry-v1", Load(V1_PATH, v1)))
        rows.append(measure_reference(cfg, server, "ferry-v2", Load(f"/v2/models/{MODEL_NAME}/infer", v2)))
    if cfg.mixed:
        rows.append(measure_reference(cfg, server, "ferry-mixed", Load(body=mixed_body(cfg))))
    if cfg.streaming:
        rows.append(measure_streaming(cfg, server))
    if cfg.locust:
        rows.append(run_locust(cfg, server, log_dir))


def protocol_bodies(cfg: BenchConfig) -> tuple[bytes, bytes]:
    """The reference request as a V1 and as a V2 REST body."""
    v1 = {"instances": [{"text": cfg.prompt, "max_new_tokens": cfg.max_new_tokens}]}
    text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": [cfg.prompt]}
    tokens = {"name": "max_new_tokens", "shape": [1], "datatype": "INT32", "data": [cfg.max_new_tokens]}
    return json.dumps(v1).encode(), json.dumps({"inputs": [text, tokens]}).encode()


def mixed_body(cfg: BenchConfig) -> BodyFactory:
    """The mixed scenario: 80 % of requests want 10 new tokens, 20 % want 100."""
    return mixed_generate_body(cfg.prompt, cfg.max_new_tokens, 100, 0.2)


def measure_streaming(cfg: BenchConfig, server: Server) -> Row:
    """Half the users stream greedy OpenAI completions, half post /generate; the ceiling is the
    engine limit at the same users, and time to first token is the streamed users' first chunk."""
    label = "ferry-stream-mix"
    stream = openai_stream_body(MODEL_NAME, cfg.prompt, cfg.max_new_tokens)
    row = measure_reference(cfg, server, label, Load(stream_path="/openai/v1/completions", stream_body=stream))
    ceiling = run_engine_limit(cfg, cfg.reference_users)
    row.ceiling_rps = ceiling.rps
    log(
        f"{'ceiling':10s} users={cfg.reference_users:<4d} {ceiling.rps:8.1f} req/s  {label}/ceiling"
        f" {report.ratio(row.rps, ceiling.rps):.2f}; TTFT p50 {(row.ttft_p50_s or 0) * 1000:.0f} ms"
        f" p99 {(row.ttft_p99_s or 0) * 1000:.0f} ms over {row.streamed or 0} streams"
    )
    return row


def run_locust(cfg: BenchConfig, server: Server, log_dir: Path) -> Row:
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
    row = read_locust_stats(Path(f"{prefix}_stats.csv"), cfg.reference_users)
    row.peak_rss_bytes = server.peak_rss_bytes()
    log(f"{'locust':10s} users={cfg.reference_users:<4d} {row.rps:8.1f} req/s (whole run)")
    return row


def read_locust_stats(path: Path, users: int) -> Row:
    """locust's Aggregated row (milliseconds) as a Row (seconds)."""
    with path.open() as f:
        for record in csv.DictReader(f):
            if record.get("Name") == "Aggregated":
                return Row(
                    server="ferry-locust",
                    users=users,
                    generator="locust",
                    rps=float(record["Requests/s"]),
                    p50_s=float(record["50%"]) / 1000,
                    p95_s=float(record["95%"]) / 1000,
                    p99_s=float(record["99%"]) / 1000,
                    completed=int(record["Request Count"]),
                    failed=int(record["Failure Count"]),
                )
    raise RuntimeError(f"no Aggregated row in {path}")


# ---- ferry at GPU speed ----------------------------------------------------------------------


def bench_sim(cfg: BenchConfig, log_dir: Path, results: Results) -> None:
    latency = LatencyModel()
    settings: dict[str, object] = {
        "engine": "simulated",
        "max_batch_size": cfg.max_batch_size,
        "max_batch_wait_s": cfg.ferry_wait_s,
        "max_queue_size": 1024,
        "sim_prefill_s": latency.prefill_s,
        "sim_step_s": latency.step_s,
        "sim_step_per_seq_s": latency.step_per_seq_s,
        "sim_concurrency": 1,
    }
    with running(start_ferry("ferry-sim", log_dir=log_dir, settings=settings), stop_timeout_s=15) as server:

        def beside_formula(users: int) -> Row:
            row, snaps = measure(cfg, server, label="ferry-sim", users=users, metrics_path="/metrics")
            ferry_batches(row, snaps)
            # The engine's formula for all `users` in one batch: n / T(n, t), independent of
            # the batches ferry formed.
            row.ceiling = simulated_ceiling([users], max_new_tokens=cfg.max_new_tokens, latency=latency)
            row.ceiling_rps = row.ceiling.rps
            return row

        sweep(cfg, cfg.levels, beside_formula, results.sweep["ferry-sim"])
        results.gpu_speed = gpu_speed(cfg, server, latency, log_dir)


def gpu_speed(cfg: BenchConfig, server: Server, latency: LatencyModel, log_dir: Path) -> GpuSpeed:
    """ferry + SimulatedEngine measured with wrk (a light generator), beside the formula
    ceiling n / T(n, t) and KServe's floor (an instant model on KServe's ModelServer, V1)."""
    n, t = cfg.reference_users, cfg.max_new_tokens
    duration = max(cfg.measure_s, 8.0)
    generate = generate_body(cfg.prompt, t)
    v1 = json.dumps({"instances": [json.loads(generate)]}).encode()
    gen = wrk.run(server.url + "/generate", generate, users=n, duration_s=duration)
    one = wrk.run(server.url + "/generate", generate, users=1, duration_s=duration)
    v1_row = wrk.run(server.url + V1_PATH, v1, users=n, duration_s=duration)
    with running(start_kserve_floor(log_dir), stop_timeout_s=5) as floor_server:
        floor = wrk.run(floor_server.url + V1_PATH, v1, users=n, duration_s=duration)
    t_n, t_1 = latency.batch_seconds(n, t), latency.batch_seconds(1, t)
    limit = n / (t_n + n / floor.rps)
    out = GpuSpeed(
        users=n, T_n_s=t_n, T_1_s=t_1, formula_rps=n / t_n,
        generate_rps=gen.rps, generate_p50_s=gen.p50_s, generate_non_2xx=gen.non_2xx,
        v1_rps=v1_row.rps, v1_non_2xx=v1_row.non_2xx, one_user_p50_s=one.p50_s, floor_rps=floor.rps,
        L_rps=limit, generate_over_formula=gen.rps / (n / t_n), v1_over_L=v1_row.rps / limit,
        one_user_p50_over_T1=one.p50_s / t_1,
    )  # fmt: skip
    log(
        f"{'gpu-speed':10s} wrk: /generate {gen.rps:.0f} req/s = {out.generate_over_formula:.2f} x"
        f" {out.formula_rps:.0f} (n / T(n, t)); V1 {v1_row.rps:.0f} = {out.v1_over_L:.2f} x L"
        f" {out.L_rps:.0f} (KServe floor {floor.rps:.0f}); 1-user p50 {one.p50_s * 1000:.1f} ms ="
        f" {out.one_user_p50_over_T1:.3f} x T(1, t) {t_1 * 1000:.1f} ms"
    )
    return out


# ---- the baselines ---------------------------------------------------------------------------

BASELINE_MODULES = {"naive": "loadtest.baselines.naive", "timer": "loadtest.baselines.timer_batcher"}


def bench_baseline(cfg: BenchConfig, name: str, log_dir: Path, results: Results) -> None:
    server = start_baseline(
        name,
        BASELINE_MODULES[name],
        log_dir=log_dir,
        model_dir=cfg.model_dir,
        engine="ctranslate2",
        inter_threads=cfg.inter_threads,
        intra_threads=cfg.intra_threads,
        compute_type=cfg.compute_type,
    )
    # uvicorn would finish every queued request first: a short stop, then a kill.
    with running(server, stop_timeout_s=3):
        # The naive server computes on its event loop, so /stats would wait behind every queued
        # request; its batch size is 1 by construction (tests/test_loadtest.py checks it).
        stats_path = None if name == "naive" else "/stats"

        def measure_once(users: int) -> Row:
            row, _ = measure(cfg, server, label=name, users=users, stats_path=stats_path)
            if name == "naive":
                row.mean_batch_size = 1.0
            return row

        sweep(cfg, cfg.levels, measure_once, results.sweep[name])
        if cfg.mixed and name == "timer":
            mixed = measure_reference(
                cfg, server, "timer-mixed", Load(body=mixed_body(cfg)), metrics_path=None, stats_path="/stats"
            )
            results.extra.append(mixed)
