"""overload: the unloaded peak (closed loop, no rejections), then an open loop at >= 10x it for
`overload_s`: every request answered 200/503/504, no other 5xx, no hang, admitted p99 <= the
deadline, RSS growth <= 50 MB, admitted throughput >= 0.9x the peak."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest.driver import percentile
from loadtest.harness import Server
from loadtest.reliability.load import latencies, reference_body
from loadtest.reliability.metrics import QUEUE_FULL, delta, mean_batch, rss_detail
from loadtest.reliability.open_loop import PeakThenOpenLoop as Measured
from loadtest.reliability.open_loop import peak_then_open_loop
from loadtest.reliability.options import Options
from loadtest.reliability.results import ScenarioResult, log
from loadtest.reliability.servers import running

ANSWERED = {"200", "503", "504"}  # served, refused at admission, past its deadline


async def _measure(opts: Options, server: Server) -> Measured:
    prof, deadline = opts.overload_profile, opts.overload_deadline_s
    log(f"overload: model capacity {prof.capacity_rps:.0f} req/s, deadline {deadline:g} s")
    return await peak_then_open_loop(
        "overload", server, reference_body(prof.max_new_tokens),
        # No more users than the queue holds: the peak is measured without rejections.
        users=min(opts.overload_queue, 3 * prof.max_batch_size), peak_s=opts.peak_s,
        factor=opts.overload_factor, open_loop_s=opts.overload_s, client_timeout_s=deadline + 10.0,
        max_outstanding=4000, rss_every_s=1.0,
    )  # fmt: skip


def _rejected_at_peak(m: Measured) -> float:
    return delta(m.peak_metrics[1], m.peak_metrics[0], QUEUE_FULL)


def _generator_figures(m: Measured) -> dict[str, Any]:
    run, span = m.run, max(m.run.send_span_s, 1e-9)
    return {
        "offered_rps": run.offered_rps,
        "offered_x_capacity": run.offered_rps / m.peak_rps if m.peak_rps else 0.0,
        "duration_s": run.send_span_s,
        "sent": run.sent,
        "generator_skipped": run.skipped,
        "generator_max_lag_s": run.max_lag_s,
        "generator_cpu_share": run.client_cpu_s / span,
        "server_cpu_share": m.server_cpu_s / span,
    }


def _answer_figures(m: Measured, warm_s: float) -> dict[str, Any]:
    """Outcomes, latencies and the throughput of 200s after the warm-up."""
    run = m.run
    admitted = latencies(run.records, {"200", "504"})
    ok_done = [r.done_s for r in run.records if r.outcome == "200" and warm_s <= r.done_s <= run.send_span_s]
    admitted_rps = len(ok_done) / max(run.send_span_s - warm_s, 1e-9)
    return {
        "outcomes": run.outcomes(),
        "admitted_rps": admitted_rps,
        "admitted_vs_peak": admitted_rps / m.peak_rps if m.peak_rps else 0.0,
        "admitted_p50_s": percentile(admitted, 50),
        "admitted_p99_s": percentile(admitted, 99),
        "admitted_max_s": admitted[-1] if admitted else 0.0,
        "admitted_count": len(admitted),
        "rejected_p99_s": percentile(latencies(run.records, {"503"}), 99),
        "max_latency_s": max((r.latency_s for r in run.records), default=0.0),
    }


def _server_figures(m: Measured) -> dict[str, Any]:
    before, after = m.before, m.after
    return {
        "server_rejected_queue_full": delta(after, before, QUEUE_FULL),
        "server_timed_out_queued": delta(after, before, 'ferry_requests_timed_out_total{stage="queued"}'),
        "server_timed_out_running": delta(after, before, 'ferry_requests_timed_out_total{stage="running"}'),
        "server_batches": delta(after, before, "ferry_batch_size_count"),
        "server_mean_batch": mean_batch(after, before),
    }


def _figures(opts: Options, m: Measured, warm_s: float) -> dict[str, Any]:
    prof = opts.overload_profile
    return {
        "profile": asdict(prof),
        "deadline_s": opts.overload_deadline_s,
        "queue_size": opts.overload_queue,
        "model_capacity_rps": prof.capacity_rps,
        "peak_users": m.peak_users,
        "unloaded_peak_rps": m.peak_rps,
        "unloaded_peak_p99_s": m.peak["p99_s"],
        "unloaded_peak_failed": m.peak["failed"],
        "unloaded_peak_rejected": _rejected_at_peak(m),
        "offered_rps_target": m.run.rate,
        **_generator_figures(m),
        **_answer_figures(m, warm_s),
        **_server_figures(m),
        "throughput_window_s": [warm_s, m.run.send_span_s],
        **m.sampler.growth(warm_s),
    }


def _judge_answers(res: ScenarioResult, m: Measured, deadline: float) -> None:
    f, outcomes = res.figures, m.run.outcomes()
    other_5xx = {k: v for k, v in outcomes.items() if k.isdigit() and k.startswith("5") and k not in ANSWERED}
    unanswered = {k: v for k, v in outcomes.items() if k not in ANSWERED}
    hang_limit = deadline + 1.0
    hangs = sum(1 for r in m.run.records if r.latency_s > hang_limit) + m.run.unfinished
    res.check("every request answered 200/503/504", not unanswered, f"{m.run.sent} sent: {outcomes}")
    res.check("zero other 5xx", not other_5xx, f"other 5xx: {other_5xx or 'none'}")
    res.check(
        "zero hangs",
        hangs == 0,
        f"{hangs} requests open longer than deadline + 1 s = {hang_limit:g} s (longest {f['max_latency_s']:.3f} s)",
    )
    res.check(
        "admitted p99 <= deadline",
        f["admitted_count"] > 0 and f["admitted_p99_s"] <= deadline,
        f"p99 {f['admitted_p99_s']:.3f} s over {f['admitted_count']} admitted (200+504), deadline {deadline:g} s",
    )


def _judge(res: ScenarioResult, m: Measured, deadline: float, warm_s: float) -> None:
    f, peak_rps, run = res.figures, m.peak_rps, m.run
    res.check(
        "offered >= 10x capacity",
        run.offered_rps >= 10 * peak_rps and peak_rps > 0,
        f"offered {run.offered_rps:.0f} req/s = {f['offered_x_capacity']:.1f}x the unloaded"
        f" peak {peak_rps:.1f} req/s (generator skipped {run.skipped})",
    )
    res.check(
        "unloaded peak without rejections",
        m.peak["failed"] == 0 and _rejected_at_peak(m) == 0,
        f"{m.peak['completed']} ok, {m.peak['failed']} failed, {_rejected_at_peak(m):.0f} rejected"
        f" at {m.peak_users} users",
    )
    _judge_answers(res, m, deadline)
    res.check("RSS growth <= 50 MB", f["rss_growth_mb"] <= 50, rss_detail(f))
    res.check(
        "admitted throughput >= 0.9x unloaded peak",
        peak_rps > 0 and f["admitted_rps"] >= 0.9 * peak_rps,
        f"{f['admitted_rps']:.1f} req/s of 200s (after {warm_s:.0f} s) vs peak {peak_rps:.1f}"
        f" = {f['admitted_vs_peak']:.2f}x",
    )


async def overload(opts: Options, log_dir: Path) -> ScenarioResult:
    settings = {
        **opts.overload_profile.settings(),
        "max_queue_size": opts.overload_queue,
        "request_timeout_s": opts.overload_deadline_s,
        "access_log": "false",
    }
    async with running("overload", log_dir, settings) as server:
        measured = await _measure(opts, server)
    warm_s = min(15.0, opts.overload_s / 4)
    res = ScenarioResult("overload", figures=_figures(opts, measured, warm_s))
    _judge(res, measured, opts.overload_deadline_s, warm_s)
    return res
