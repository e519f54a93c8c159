"""`make reliability`: overload, engine faults, SIGTERM drain, client disconnects, a soak, slow
clients and hostile inputs, each against the real server (`python -m predictor`) in a subprocess
on 127.0.0.1, with a pass/fail verdict per criterion of issue 3 ("What it must show").

Results: a table and verdicts on stdout, bench-results/reliability-<timestamp>.{json,md}; server
logs in bench-results/reliability-<timestamp>-logs/. Exit status 1 when any criterion fails.

`python -m loadtest.reliability --quick` runs every scenario in a short mode (about 2 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest.driver import install_fast_loop
from loadtest.reliability.options import Options
from loadtest.reliability.report import figures_table, machine, table, write_outputs
from loadtest.reliability.runner import SCENARIOS, run_all
from loadtest.reliability.servers import stop_all

# Flags copied onto Options under the same name when given.
PLAIN_FLAGS = ("overload_s", "overload_factor", "overload_queue", "soak_s", "soak_warmup_s", "model_dir", "out_dir")


def description() -> str:
    """This module's text, then each scenario's (its module's docstring), in the default order."""
    scenarios = "\n".join(f"- {sys.modules[run.__module__].__doc__}" for run in SCENARIOS.values())
    return f"{__doc__}\nScenarios (each starts and stops its own server, whatever happens):\n\n{scenarios}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.reliability",
        description=description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, in order")
    p.add_argument("--quick", action="store_true", help="short mode for every scenario (~2 min)")
    p.add_argument("--overload-s", type=float, help="overload duration (default 60)")
    p.add_argument("--overload-factor", type=float, help="offered / unloaded peak (default 11)")
    p.add_argument("--overload-max-batch", type=int, help="overload engine's max batch (default 4)")
    p.add_argument("--overload-queue", type=int, help="overload max_queue_size (default 32)")
    p.add_argument("--soak-s", type=float, help="soak duration (default 600)")
    p.add_argument("--soak-warmup-s", type=float, help="soak RSS warm-up (default 60)")
    p.add_argument("--model-dir", type=Path, help="CTranslate2 model for the soak")
    p.add_argument("--out-dir", type=Path, help="default bench-results")
    return p


def options_from_args(argv: list[str] | None = None) -> tuple[Options, list[str], str]:
    arg_parser = parser()
    args = arg_parser.parse_args(argv)
    overrides: dict[str, Any] = {name: getattr(args, name) for name in PLAIN_FLAGS if getattr(args, name) is not None}
    opts = Options.quick(**overrides) if args.quick else Options(**overrides)
    if args.overload_max_batch is not None:
        opts.overload_profile.max_batch_size = args.overload_max_batch
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        arg_parser.error(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    return opts, names, "quick" if args.quick else "full"


def main(argv: list[str] | None = None) -> int:
    opts, names, mode = options_from_args(argv)
    install_fast_loop()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = opts.out_dir / f"reliability-{stamp}-logs"
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "command": "python -m loadtest.reliability " + " ".join(argv if argv is not None else sys.argv[1:]),
        "mode": mode,
        "options": asdict(opts),
        "scenarios": names,
    }
    try:
        results = asyncio.run(run_all(names, opts, log_dir))
    finally:
        stop_all()
    json_path, md_path = write_outputs(results, meta, opts.out_dir, stamp)
    print("\n== figures\n" + figures_table(results))
    print("\n== criteria\n" + table(results))
    passed = all(r.ok for r in results)
    print(f"\nOverall: {'PASS' if passed else 'FAIL'}  ({json_path}, {md_path}; server logs in {log_dir})")
    return 0 if passed else 1
