"""`make bench`: the summary ratios, one PASS/MISS verdict per target, and the Markdown and
JSON outputs."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from loadtest import report
from loadtest.bench_config import (
    SIM_TARGET_RPS,
    BenchConfig,
)
from loadtest.driver import (
    GENERATOR_NAME,
)


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
