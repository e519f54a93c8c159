"""soak: the real CTranslate2 model (models/opt-125m): capacity from a 40-user closed loop, then
~80 % of it open-loop for `soak_s`: no error, RSS flat after a warm-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.driver import percentile
from loadtest.harness import Server
from loadtest.reliability.load import latencies, reference_body
from loadtest.reliability.metrics import MB, delta, mean_batch, rss_bytes, rss_detail
from loadtest.reliability.open_loop import PeakThenOpenLoop as Measured
from loadtest.reliability.open_loop import Tick, peak_then_open_loop
from loadtest.reliability.options import Options
from loadtest.reliability.results import ScenarioResult, log
from loadtest.reliability.servers import running

TOKENS = 10


def _progress(server: Server, every_s: float) -> Tick:
    """Logs the server's RSS every `every_s` of the open loop."""
    last = [0.0]

    async def tick(elapsed: float) -> None:
        if elapsed - last[0] >= every_s:
            last[0] = elapsed
            log(f"soak: {elapsed:5.0f} s, RSS {rss_bytes(server.pid) / MB:.1f} MB")

    return tick


async def _measure(opts: Options, server: Server) -> Measured:
    """Capacity from a closed loop, then `soak_fraction` of it open-loop for `soak_s`."""
    return await peak_then_open_loop(
        "soak", server, reference_body(TOKENS), users=opts.soak_users, peak_s=opts.soak_capacity_s,
        factor=opts.soak_fraction, open_loop_s=opts.soak_s, client_timeout_s=40.0, max_outstanding=2000,
        rss_every_s=2.0, tick=_progress(server, max(10.0, opts.soak_s / 20)),
    )  # fmt: skip


def _figures(opts: Options, m: Measured, warm_s: float) -> dict[str, Any]:
    run, capacity = m.run, m.peak_rps
    ok = latencies(run.records, {"200"})
    return {
        "model_dir": str(opts.model_dir),
        "capacity_rps": capacity,
        "capacity_p99_s": m.peak["p99_s"],
        "offered_rps": run.offered_rps,
        "offered_fraction": run.offered_rps / capacity if capacity else 0.0,
        "duration_s": run.send_span_s,
        "warmup_s": warm_s,
        "sent": run.sent,
        "generator_skipped": run.skipped,
        "outcomes": run.outcomes(),
        "ok_rps": len(ok) / max(run.send_span_s, 1e-9),
        "p50_s": percentile(ok, 50),
        "p99_s": percentile(ok, 99),
        "max_s": ok[-1] if ok else 0.0,
        "server_engine_failures": delta(m.after, m.before, "ferry_engine_failures_total"),
        "server_mean_batch": mean_batch(m.after, m.before),
        "rss_samples_mb": [(round(t, 1), round(b / MB, 1)) for t, b in m.sampler.samples],
        **m.sampler.growth(warm_s),
    }


def _judge(res: ScenarioResult, m: Measured) -> None:
    f, run, capacity = res.figures, m.run, m.peak_rps
    errors = {k: v for k, v in f["outcomes"].items() if k != "200"}
    res.check(
        "offered ~80 % of capacity",
        capacity > 0 and 0.7 <= run.offered_rps / capacity <= 0.9 and run.skipped == 0,
        f"{run.offered_rps:.1f} req/s offered = {f['offered_fraction']:.2f}x capacity {capacity:.1f}",
    )
    res.check("no error", not errors and run.sent > 0, f"{run.sent} sent: {f['outcomes']}")
    res.check("RSS growth <= 30 MB after warm-up", f["rss_growth_mb"] <= 30, rss_detail(f))


async def soak(opts: Options, log_dir: Path) -> ScenarioResult:
    """The real CTranslate2 model at ~80 % of its measured capacity: no error, RSS flat."""
    settings = {
        "model_dir": opts.model_dir,
        "inter_threads": opts.inter_threads,
        "intra_threads": opts.intra_threads,
        "max_batch_size": 50,
        "max_queue_size": 1024,
        "access_log": "false",
    }
    async with running("soak", log_dir, settings) as server:
        measured = await _measure(opts, server)
    res = ScenarioResult("soak", figures=_figures(opts, measured, min(opts.soak_warmup_s, opts.soak_s / 4)))
    _judge(res, measured)
    return res
