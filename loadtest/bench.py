"""`make bench` / `make bench-quick`: ferry beside the engine ceiling and the write-up's servers.

One run, one machine, one model directory, the same CTranslate2 settings for everyone, one load
generator (loadtest/driver.py, closed loop):

1. ferry on CTranslate2 with its own defaults (thread plan `auto`), and after each of its
   measurements the engine's limit at the same requests in flight: CTranslate2 called directly
   with perfectly formed batches in the best of its configurations (loadtest/engine_limit.py),
   independent of the batches ferry formed;
2. the naive FastAPI server (engine on the event loop, one request per call);
3. the timer batcher (FastAPI + background task, max batch 50, fixed 100 ms wait);
4. ferry with SimulatedEngine at GPU-class speed, beside that engine's formula ceiling and
   KServe's floor (a model that answers at once on KServe's ModelServer), measured with wrk:
   the closed-loop limit at n users is L = n / (T(n, t) + n / floor).

Each server is measured at every concurrency of the sweep; the reference concurrency (40) is
measured `reps` times and reported as the median. ferry's 1-user p50 is judged against the
engine's batch-1 latency sampled in blocks alternating with ferry's own (loadtest/one_user.py),
so this machine's drift in speed falls on both. Everything runs on 127.0.0.1 in subprocesses
that are stopped at the end, whatever happens. Results: bench-results/bench-<mode>.{json,md};
plots: docs/ (full mode) or bench-results/ (quick mode).

Quick mode takes about 4 minutes; full mode about 23 (bounded: every warm-up, window and
engine-limit measurement has a cap; see --help for the knobs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from loadtest import report
from loadtest.bench_config import DEFAULT_GATHER_CAP_S, FULL_LEVELS, QUICK_LEVELS, REFERENCE_PROMPT, BenchConfig, log
from loadtest.bench_results import Results
from loadtest.bench_servers import bench_baseline, bench_ferry, bench_sim
from loadtest.bench_summary import machine, summarize, write_outputs
from loadtest.driver import GENERATOR_NAME, install_fast_loop


def run(cfg: BenchConfig) -> Results:
    install_fast_loop()
    started = time.monotonic()
    log_dir = cfg.out_dir / f"logs-{cfg.mode}"
    results = Results(
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        generator=GENERATOR_NAME,
        machine=machine(),
        sweep={name: [] for name in cfg.servers if name != "ferry-no-gather"},
    )
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
                results.failures[name] = f"{type(exc).__name__}: {exc}"
    finally:
        finish(cfg, results, time.monotonic() - started)
    print()
    print((cfg.out_dir / f"bench-{cfg.mode}.md").read_text())
    log(f"done in {results.elapsed_s:.0f} s; results: {cfg.out_dir}/bench-{cfg.mode}.md, .json")
    return results


def finish(cfg: BenchConfig, results: Results, elapsed_s: float) -> None:
    """Summary, capacity advice, plots (a sweep of more than two levels), and the outputs."""
    results.machine.loadavg_end = os.getloadavg()
    results.elapsed_s = elapsed_s
    summary = results.summary = summarize(cfg, results)
    if summary.capacity:
        source = f"the ferry sweep ({cfg.mode} mode, {os.cpu_count()} CPUs)"
        summary.capacity_yaml = report.capacity_yaml(summary.capacity, source)
    if len(cfg.levels) > 2:
        from loadtest.plots import plot_sweep

        title = f"ferry vs baselines, OPT-125m-shaped int8, {os.cpu_count()} CPUs ({GENERATOR_NAME})"
        results.plots = [str(p) for p in plot_sweep(results.sweep, cfg.plots_dir, title)]
    write_outputs(cfg, results)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


# Flags that are BenchConfig fields of the same name, taken as given.
SAME_NAMED = (
    "mode", "model_dir", "out_dir", "inter_threads", "intra_threads", "compute_type", "prompt", "max_new_tokens",
)  # fmt: skip


def config_from_args(argv: list[str] | None = None) -> BenchConfig:
    args = parse_args(argv)
    full = args.mode == "full"
    default_servers = "ferry,naive,timer,ferry-sim" + (",ferry-no-gather" if full else "")

    def given(value: float | None, quick: float, full_mode: float) -> float:
        return value if value is not None else (full_mode if full else quick)

    return BenchConfig(
        **{name: getattr(args, name) for name in SAME_NAMED},
        levels=[int(x) for x in args.levels.split(",")] if args.levels else (FULL_LEVELS if full else QUICK_LEVELS),
        warmup_s=given(args.warmup, 2.0, 3.0),
        measure_s=given(args.measure, 6.0, 10.0),
        reps=int(given(args.reps, 1, 3)),
        max_warmup_s=25.0 if full else 12.0,
        plots_dir=args.plots_dir or (Path("docs") if full else args.out_dir),
        ferry_wait_s=args.ferry_wait,
        servers=[s for s in (args.servers or default_servers).split(",") if s],
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
