"""`make bench`: each server measured over the sweep (ferry, the baselines, ferry at GPU speed
beside KServe's floor) and the extra rows (protocols, mixed lengths, streaming, locust)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtest import report, wrk
from loadtest.bench_config import (
    BenchConfig,
    log,
)
from loadtest.bench_measure import (
    ferry_batches,
    ferry_thread_plan,
    measure,
    run_engine_limit,
)
from loadtest.ceiling import simulated_ceiling
from loadtest.driver import (
    generate_body,
    mixed_generate_body,
    openai_stream_body,
)
from loadtest.procs import ROOT, Server, start_baseline, start_ferry, start_kserve_floor
from predictor.engine import LatencyModel


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
        results.setdefault("ferry_thread_plan", ferry_thread_plan(server))
        for users in levels or cfg.levels:
            for rep in range(cfg.repetitions(users)):
                row, snaps = measure(cfg, server, label=label, users=users, metrics_path="/metrics")
                row["rep"] = rep
                ferry_batches(row, snaps)
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
            results["extra"].append(measure_streaming(cfg, server))
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
                ferry_batches(row, snaps)
                # The engine's formula for all `users` in one batch: n / T(n, t), independent of
                # the batches ferry formed.
                ceiling = simulated_ceiling([users], max_new_tokens=cfg.max_new_tokens, latency=latency)
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


def measure_streaming(cfg: BenchConfig, server: Server) -> dict[str, Any]:
    """Half the users stream greedy OpenAI completions, half post /generate; the ceiling is the
    engine limit at the same users, and time to first token is the streamed users' first chunk."""
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
