"""`make bench`: the summary ratios, one PASS/MISS verdict per target, and the Markdown and
JSON outputs."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from loadtest import report
from loadtest.bench_config import SIM_TARGET_RPS, BenchConfig
from loadtest.bench_results import GpuSpeed, Machine, Results, Row, Summary, to_json
from loadtest.driver import GENERATOR_NAME


def machine() -> Machine:
    import ctranslate2

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return Machine(
        cpus=os.cpu_count(),
        cpu=cpu,
        python=platform.python_version(),
        ctranslate2=ctranslate2.__version__,
        loadavg_start=os.getloadavg(),
    )


# ---- the summary -----------------------------------------------------------------------------


class _Medians:
    """The median run of each server at each concurrency."""

    def __init__(self, results: Results) -> None:
        self.results = results

    def __call__(self, server: str, users: int) -> Row | None:
        rows = self.results.rows_at(server, users)
        return report.median_row(rows) if rows else None


def summarize(cfg: BenchConfig, results: Results) -> Summary:
    s = Summary(reference_users=cfg.reference_users, gpu_speed=results.gpu_speed)
    med = _Medians(results)
    _ferry_against_yardsticks(cfg, results, med, s)
    _ferry_against_baselines(cfg, med, s)
    _simulated_engine(cfg, med, s)
    _extra_rows(cfg, results.extra, med("ferry", cfg.reference_users), s)
    ferry_points = [m for users in cfg.levels if (m := med("ferry", users))]
    s.capacity = report.capacity_advice(ferry_points) if len(ferry_points) >= 2 else None
    return s


def _ferry_against_yardsticks(cfg: BenchConfig, results: Results, med: _Medians, s: Summary) -> None:
    """ferry / the engine limit at the reference; ferry's 1-user p50 / the engine's batch-1 latency."""
    ferry_ref = results.rows_at("ferry", cfg.reference_users)
    if ferry_ref:
        ratios = [report.ratio(r.rps, r.ceiling_rps) for r in ferry_ref if r.ceiling_rps]
        s.ferry_over_ceiling = report.median_of(ratios)
    # 1 user: sampled in blocks alternating with the engine's batch-1 calls (loadtest/one_user.py).
    if (pair := results.ferry_one_user) is not None:
        s.ferry_p50_1_user_s = pair.server_p50_s
        s.engine_single_latency_s = pair.engine_p50_s
        s.ferry_p50_over_engine_single = pair.ratio


def _ferry_against_baselines(cfg: BenchConfig, med: _Medians, s: Summary) -> None:
    by_users = {
        users: report.ratio(f.rps, t.rps)
        for users in cfg.levels
        if (f := med("ferry", users)) and (t := med("timer", users))
    }
    if by_users:
        s.ferry_over_timer_by_users = by_users
        s.ferry_over_timer_min = min(by_users.values())
    ref = cfg.reference_users
    f, naive, timer = med("ferry", ref), med("naive", ref), med("timer", ref)
    if f and naive:
        s.ferry_over_naive = report.ratio(f.rps, naive.rps)
    if f and timer:
        s.ferry_over_timer = report.ratio(f.rps, timer.rps)
    f1, t1 = med("ferry", 1), med("timer", 1)
    if f1 and t1:
        s.ferry_over_timer_1_user = report.ratio(f1.rps, t1.rps)
        s.timer_over_ferry_p50_1_user = report.ratio(t1.p50_s, f1.p50_s)


def _simulated_engine(cfg: BenchConfig, med: _Medians, s: Summary) -> None:
    sim = med("ferry-sim", cfg.reference_users)
    if sim:
        s.sim_rps = sim.rps
        s.sim_over_ceiling = report.ratio(sim.rps, sim.ceiling_rps or 0.0)
    sim_ok = [
        r.users
        for users in cfg.levels
        if (r := med("ferry-sim", users)) and report.ratio(r.rps, r.ceiling_rps or 0.0) >= 0.9
    ]
    s.sim_highest_users_at_0_9_ceiling = max(sim_ok) if sim_ok else None


def _extra_rows(cfg: BenchConfig, extra: list[Row], ferry_ref: Row | None, s: Summary) -> None:
    """Mixed lengths (short requests' p50 beside all-short) and the streamed mix."""
    short = str(cfg.max_new_tokens)
    for row in extra:
        kinds = row.p50_by_max_new_tokens or {}
        if row.server == "ferry-mixed" and short in kinds and ferry_ref:
            s.mixed_short_p50_s = kinds[short]
            s.all_short_p50_s = ferry_ref.p50_s
            s.mixed_short_over_all_short_p50 = report.ratio(kinds[short], ferry_ref.p50_s)
        if row.server == "ferry-stream-mix" and row.ceiling_rps:
            s.stream_mix_over_ceiling = report.ratio(row.rps, row.ceiling_rps)
            s.stream_ttft_p50_s = row.ttft_p50_s or 0.0
            s.stream_ttft_p99_s = row.ttft_p99_s or 0.0


# ---- the verdicts ----------------------------------------------------------------------------


def _line(ok: bool, text: str) -> str:
    return ("PASS  " if ok else "MISS  ") + text


def verdicts(cfg: BenchConfig, s: Summary) -> list[str]:
    """One PASS/MISS line per target of the issue, with the figures behind it."""
    lines = _ferry_verdicts(s) + _timer_verdicts(s)
    if s.gpu_speed is not None:
        lines += _gpu_speed_verdicts(s.gpu_speed)
    return lines + _scenario_verdicts(s)


def _ferry_verdicts(s: Summary) -> list[str]:
    ref, lines = s.reference_users, []
    if (v := s.ferry_over_ceiling) is not None:
        lines.append(
            _line(v >= 0.95, f"ferry / engine limit (its best configuration, same in flight) at {ref} users"
                  f" = {v:.2f} (>= 0.95)")
        )  # fmt: skip
    if (v := s.ferry_p50_over_engine_single) is not None:
        ms = f"{(s.ferry_p50_1_user_s or 0) * 1000:.0f} ms / {(s.engine_single_latency_s or 0) * 1000:.0f} ms"
        lines.append(
            _line(v <= 1.05, f"ferry p50 at 1 user / engine's best batch-1 latency = {v:.2f} ({ms},"
                  " sampled in alternating blocks; <= 1.05)")
        )
    if (v := s.ferry_over_naive) is not None:
        lines.append(_line(v >= 8, f"ferry / naive at {ref} users = {v:.1f} (>= 8)"))
    return lines


def _timer_verdicts(s: Summary) -> list[str]:
    lines = []
    if (v := s.ferry_over_timer) is not None:
        lines.append(_line(v > 1, f"ferry / timer batcher at {s.reference_users} users = {v:.2f} (> 1)"))
    if (v := s.ferry_over_timer_1_user) is not None:
        p50 = f"timer p50 = {s.timer_over_ferry_p50_1_user or 0:.2f}x"
        lines.append(_line(v >= 1.6, f"ferry / timer batcher at 1 user = {v:.2f} (>= 1.6; {p50})"))
    if (v := s.ferry_over_timer_min) is not None:
        each = ", ".join(f"{u}: {r:.2f}" for u, r in (s.ferry_over_timer_by_users or {}).items())
        lines.append(_line(v >= 1.0, f"ferry / timer batcher at every swept concurrency >= 1 (min {v:.2f}; {each})"))
    return lines


def _gpu_speed_verdicts(g: GpuSpeed) -> list[str]:
    return [
        _line(g.generate_over_formula >= 0.8, f"GPU speed, wrk, {g.users} users: /generate {g.generate_rps:.0f}"
              f" req/s = {g.generate_over_formula:.2f} x n/T(n,t) {g.formula_rps:.0f} (>= 0.8)"),
        _line(g.v1_over_L >= 0.9, f"GPU speed: V1 {g.v1_rps:.0f} req/s = {g.v1_over_L:.2f} x L {g.L_rps:.0f}"
              f" (KServe floor {g.floor_rps:.0f} req/s; >= 0.9)"),
        _line(g.one_user_p50_over_T1 <= 1.06, f"GPU speed: 1-user p50 {g.one_user_p50_s * 1000:.1f} ms ="
              f" {g.one_user_p50_over_T1:.3f} x T(1,t) {g.T_1_s * 1000:.1f} ms (<= 1.06)"),
    ]  # fmt: skip


def _scenario_verdicts(s: Summary) -> list[str]:
    """Mixed lengths, ferry at GPU speed against the write-up's target, the streamed mix."""
    lines = []
    if (v := s.mixed_short_over_all_short_p50) is not None:
        ms = f"{(s.mixed_short_p50_s or 0) * 1000:.0f} ms vs {(s.all_short_p50_s or 0) * 1000:.0f} ms"
        text = f"mixed lengths (80 % 10, 20 % 100 tokens): short p50 / all-short p50 = {v:.2f} ({ms}; <= 1.2)"
        lines.append(_line(v <= 1.2, text))
    if (v := s.sim_rps) is not None:
        share = f"{s.sim_over_ceiling or 0:.2f} of its ceiling"
        lines.append(
            _line(v >= SIM_TARGET_RPS, f"ferry + SimulatedEngine at {s.reference_users} users = {v:.0f} req/s"
                  f" (>= {SIM_TARGET_RPS:.0f}; {share})")
        )  # fmt: skip
        lines.append(
            "      highest swept concurrency with ferry + SimulatedEngine >= 0.9 x its ceiling: "
            f"{s.sim_highest_users_at_0_9_ceiling}"
        )
    if (v := s.stream_mix_over_ceiling) is not None:
        ttft = f"TTFT p50 {(s.stream_ttft_p50_s or 0) * 1000:.0f} ms, p99 {(s.stream_ttft_p99_s or 0) * 1000:.0f} ms"
        lines.append(
            _line(v >= 0.9, f"streamed (OpenAI) + plain mix at {s.reference_users} users / ceiling = {v:.2f}"
                  f" (>= 0.9; {ttft})")
        )  # fmt: skip
    return lines


# ---- the outputs -----------------------------------------------------------------------------


def machine_line(m: Machine) -> str:
    end = f"{m.loadavg_end[0]:.2f}" if m.loadavg_end else "-"
    return (
        f"Machine: {m.cpus} CPUs ({m.cpu}), CTranslate2 {m.ctranslate2},"
        f" load average {m.loadavg_start[0]:.2f} at start, {end} at end."
    )


def _median_rows(cfg: BenchConfig, results: Results, users: int) -> list[Row]:
    """Each server's median run at `users`, in the configuration's order."""
    return [report.median_row(rows) for server in cfg.servers if (rows := results.rows_at(server, users))]


def _header(cfg: BenchConfig, results: Results) -> list[str]:
    body = {"text": cfg.prompt, "max_new_tokens": cfg.max_new_tokens}
    return [
        f"# ferry benchmark ({cfg.mode} mode)",
        "",
        machine_line(results.machine),
        f"Model: `{cfg.model_dir}`, compute type {cfg.compute_type}; ferry with its own thread plan"
        f" {results.ferry_thread_plan or {}}; the baselines with inter_threads {cfg.inter_threads},"
        f" intra_threads {cfg.intra_threads}; the engine limit in its best configuration at each"
        f" concurrency; max batch {cfg.max_batch_size}; ferry max_batch_wait_s {cfg.ferry_wait_s}.",
        f"Request: `POST /generate {json.dumps(body)}`.",
        f"Load generator: {GENERATOR_NAME} unless the row says locust;"
        f" warm-up >= {cfg.warmup_s:g} s, window {cfg.measure_s:g} s;"
        f" reference rows are the median of {cfg.reps} run(s).",
    ]


def markdown(cfg: BenchConfig, results: Results, s: Summary) -> str:
    md = [
        *_header(cfg, results),
        "",
        f"## Reference: {cfg.reference_users} users",
        "",
        report.markdown_table(_median_rows(cfg, results, cfg.reference_users) + results.extra),
        "",
        "## Idle: 1 user",
        "",
        report.markdown_table(_median_rows(cfg, results, 1)),
        "",
        "## Verdicts",
        "",
        "```",
        *verdicts(cfg, s),
        "```",
        "",
        "## Concurrency sweep",
        "",
        report.sweep_table(results.sweep),
        "",
    ]
    if s.capacity_yaml:
        md += ["## Capacity advice (Helm values)", "", "```yaml", s.capacity_yaml, "```", ""]
    if results.plots:
        md += ["Plots: " + ", ".join(results.plots), ""]
    return "\n".join(md)


def write_outputs(cfg: BenchConfig, results: Results) -> None:
    summary = results.summary or summarize(cfg, results)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / f"bench-{cfg.mode}.md").write_text(markdown(cfg, results, summary))
    (cfg.out_dir / f"bench-{cfg.mode}.json").write_text(to_json(results))
