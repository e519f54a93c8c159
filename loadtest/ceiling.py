"""The engine ceiling: CTranslate2 called directly, back to back, with no server in the way.

Given the batch sizes a server formed (their exact distribution), the same generator settings
(compute type, inter/intra threads) and the same number of calls in flight as the server's
engine slots, it replays those batches as fast as the engine allows. No server fed by the same
batches can answer faster. It also measures the engine's single-request latency (batch 1, one
call at a time), which a server's latency at one user is compared with.

Run in its own process by the benchmark (`python -m loadtest.ceiling ...` prints JSON), so its
threads and memory are measured apart from the server's. `simulated_ceiling` is the same figure
for SimulatedEngine, computed from its latency model (the engine *is* that formula).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from predictor.engine import LatencyModel, resolve_compute_type, resolve_device
from predictor.tokenizer import shared_tokenizer

# ---- what ferry formed: its ferry_batch_size histogram ----------------------------------


def histogram_snapshot(metrics_text: str, name: str = "ferry_batch_size") -> dict[str, Any]:
    """{"buckets": {le: cumulative count}, "count": n, "sum": s} of one Prometheus histogram."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == f"{name}_count":
                count = sample.value
            elif sample.name == f"{name}_sum":
                total = sample.value
    return {"buckets": buckets, "count": count, "sum": total}


def metric_value(metrics_text: str, name: str) -> float:
    """Sum of every sample of one metric (counter, gauge, or a histogram's _sum/_count)."""
    value = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                value += sample.value
    return value


def batch_sizes_between(before: dict[str, Any], after: dict[str, Any]) -> list[int]:
    """The batch sizes formed between two histogram snapshots.

    Buckets up to 8 are one size wide, so those sizes are exact. A wider bucket (8, 16] only
    gives its count; its sizes are filled so that the total equals the histogram's exact _sum
    (each kept inside its bucket, spread as evenly as the sum allows). Count, sum and the
    bucket of every batch are therefore the ones ferry formed.
    """
    edges = sorted(after["buckets"])
    counts: list[tuple[int, int, int]] = []  # (low exclusive, high inclusive, count)
    previous_cum = 0
    low = 0
    for edge in edges:
        if edge == float("inf"):
            continue
        cum = round(after["buckets"][edge] - before["buckets"].get(edge, 0.0))
        counts.append((low, int(edge), cum - previous_cum))
        previous_cum = cum
        low = int(edge)
    total_count = round(after["count"] - before["count"])
    if total_count > previous_cum:  # above the largest edge (cannot happen with max_batch_size)
        counts.append((low, low + 1, total_count - previous_cum))
    target_sum = round(after["sum"] - before["sum"])

    sizes: list[int] = []
    wide: list[tuple[int, int, int]] = []
    for lo, hi, n in counts:
        if n <= 0:
            continue
        if hi - lo == 1:
            sizes.extend([hi] * n)
        else:
            wide.append((lo, hi, n))
    remaining = target_sum - sum(sizes)
    wide_n = sum(n for _, _, n in wide)
    if wide_n:
        # Start each wide bucket at its lowest size, then hand out what is left of the sum one
        # unit at a time, round-robin over every batch that still has room in its bucket.
        slots = [[lo + 1, hi] for lo, hi, n in wide for _ in range(n)]
        left = remaining - sum(s[0] for s in slots)
        while left > 0:
            grew = False
            for slot in slots:
                if left <= 0:
                    break
                if slot[0] < slot[1]:
                    slot[0] += 1
                    left -= 1
                    grew = True
            if not grew:
                break
        sizes.extend(s[0] for s in slots)
    return sizes


# ---- the CTranslate2 ceiling ----------------------------------------------------------


def ctranslate2_ceiling(
    model_dir: Path,
    sizes: Sequence[int],
    *,
    prompt: str,
    max_new_tokens: int,
    concurrency: int,
    inter_threads: int,
    intra_threads: int,
    compute_type: str = "auto",
    time_cap_s: float = 10.0,
    single_runs: int = 7,
    seed: int = 0,
    max_in_flight: int | None = None,
) -> dict[str, Any]:
    """Replays `sizes` with `concurrency` calls at once. `max_in_flight` (the server's closed-loop
    users) bounds the requests in flight across those calls, as it bounded the server: 40 users
    batched as one 40 leave the second slot idle, and no replay may fill it."""
    import ctranslate2

    device = resolve_device("auto")
    generator = ctranslate2.Generator(
        str(model_dir),
        device=device,
        compute_type=resolve_compute_type(compute_type, device),
        inter_threads=inter_threads,
        intra_threads=intra_threads,
    )
    tokens = shared_tokenizer().encode(prompt)
    options: dict[str, Any] = {
        "max_length": max_new_tokens,
        "min_length": max_new_tokens,
        "include_prompt_in_result": False,
        "beam_size": 1,
    }

    def run(n: int) -> None:
        generator.generate_batch([tokens] * n, **options)

    # Warm-up: every thread's replica, at a size from the distribution.
    warm = max(sizes) if sizes else 1
    threads = [threading.Thread(target=run, args=(warm,)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    single: list[float] = []
    for _ in range(single_runs):
        started = time.perf_counter()
        run(1)
        single.append(time.perf_counter() - started)

    cpu0 = time.process_time()
    order, done, wall = _replay(
        sizes, run, concurrency=concurrency, max_in_flight=max_in_flight, time_cap_s=time_cap_s, seed=seed
    )
    cpu = time.process_time() - cpu0
    requests = sum(n for n, _ in done)
    ones = [seconds for n, seconds in done if n == 1]
    return {
        "engine": "ctranslate2",
        "compute_type": generator.compute_type,
        "device": device,
        "inter_threads": inter_threads,
        "intra_threads": intra_threads,
        "concurrency": concurrency,
        "max_in_flight": max_in_flight,
        "batches": len(done),
        "batches_given": len(order),
        "requests": requests,
        "wall_s": wall,
        "rps": requests / wall if wall > 0 else 0.0,
        "mean_batch_size": requests / len(done) if done else 0.0,
        "mean_batch_seconds": statistics.fmean(s for _, s in done) if done else 0.0,
        "cpu_s_per_request": cpu / requests if requests else 0.0,
        # The engine's own latency for one request: the median batch-1 call of the replay when it
        # has enough of them (at 1 user it is nothing else, measured over the same length of
        # time as the server), else of the separate single runs.
        "single_latency_s": statistics.median(ones if len(ones) >= 5 else single),
        "single_latency_samples": len(ones) if len(ones) >= 5 else len(single),
        "single_latencies_s": single,
    }


def simulated_ceiling(
    sizes: Sequence[int], *, max_new_tokens: int, latency: LatencyModel, concurrency: int = 1
) -> dict[str, Any]:
    """SimulatedEngine's limit for these batches: its own latency formula, `concurrency` at once."""
    seconds = sum(latency.batch_seconds(n, max_new_tokens) for n in sizes)
    requests = sum(sizes)
    return {
        "engine": "simulated",
        "concurrency": concurrency,
        "batches": len(sizes),
        "requests": requests,
        "rps": requests / (seconds / concurrency) if seconds > 0 else 0.0,
        "mean_batch_size": requests / len(sizes) if sizes else 0.0,
        "mean_batch_seconds": seconds / len(sizes) if sizes else 0.0,
        "single_latency_s": latency.batch_seconds(1, max_new_tokens),
    }


def _replay(
    sizes: Sequence[int],
    run: Callable[[int], None],
    *,
    concurrency: int,
    max_in_flight: int | None,
    time_cap_s: float,
    seed: int,
) -> tuple[list[int], list[tuple[int, float]], float]:
    """Calls `run(n)` for each batch size, `concurrency` at once and back to back, never with
    more than `max_in_flight` requests out (as the server's users bound it), until the sizes or
    the time cap run out. Returns (the shuffled order, (size, seconds) per call, wall seconds)."""
    order = list(sizes)
    random.Random(seed).shuffle(order)  # a prefix (when the time cap cuts it) is a fair sample
    lock = threading.Condition()
    done: list[tuple[int, float]] = []
    position = 0
    in_flight = 0
    limit = max_in_flight or sum(order) or 1
    started = time.perf_counter()
    cap = started + time_cap_s

    def worker() -> None:
        nonlocal position, in_flight
        while True:
            with lock:
                while (
                    position < len(order)
                    and in_flight > 0
                    and in_flight + min(order[position], limit) > limit
                ):
                    lock.wait()  # the population is busy: as in the server, wait for answers
                if position >= len(order) or time.perf_counter() >= cap:
                    lock.notify_all()
                    return
                n = order[position]
                position += 1
                in_flight += n
            t0 = time.perf_counter()
            run(n)
            with lock:
                done.append((n, time.perf_counter() - t0))
                in_flight -= n
                lock.notify_all()

    workers = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return order, done, time.perf_counter() - started


def simulated_engine_ceiling(
    sizes: Sequence[int],
    *,
    prompt: str,
    max_new_tokens: int,
    latency: LatencyModel,
    concurrency: int = 1,
    max_in_flight: int | None = None,
    time_cap_s: float = 3.0,
    seed: int = 0,
) -> dict[str, Any]:
    """SimulatedEngine itself, called back to back with these batches (its sleeps overshoot the
    formula a little, and no server can avoid that), plus the formula's own figure."""
    from predictor.engine import GREEDY, Collect, EngineItem, SimulatedEngine

    engine = SimulatedEngine(name="ceiling", latency=latency, concurrency=concurrency)
    tokens = shared_tokenizer().encode(prompt)

    def run(n: int) -> None:
        items = [EngineItem(tokens, max_new_tokens, ignore_eos=True) for _ in range(n)]
        engine.generate(items, GREEDY, Collect(n))

    order, done, wall = _replay(
        sizes, run, concurrency=concurrency, max_in_flight=max_in_flight, time_cap_s=time_cap_s, seed=seed
    )
    requests = sum(n for n, _ in done)
    formula = simulated_ceiling(
        sizes, max_new_tokens=max_new_tokens, latency=latency, concurrency=concurrency
    )
    ones = [seconds for n, seconds in done if n == 1]
    return {
        "engine": "simulated",
        "concurrency": concurrency,
        "max_in_flight": max_in_flight,
        "batches": len(done),
        "batches_given": len(order),
        "requests": requests,
        "wall_s": wall,
        "rps": requests / wall if wall > 0 else 0.0,
        "formula_rps": formula["rps"],
        "mean_batch_size": requests / len(done) if done else 0.0,
        "mean_batch_seconds": statistics.fmean(s for _, s in done) if done else 0.0,
        "single_latency_s": statistics.median(ones) if ones else formula["single_latency_s"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=Path("models/opt-125m"))
    parser.add_argument(
        "--sizes", default="40,40,40,40", help="comma-separated batch sizes, or @file.json"
    )
    parser.add_argument("--prompt", default="Hello World, what is your name dog?")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument(
        "--concurrency", type=int, default=1, help="calls in flight (the server's slots)"
    )
    parser.add_argument("--inter-threads", type=int, default=1)
    parser.add_argument("--intra-threads", type=int, default=0)
    parser.add_argument("--compute-type", default="auto")
    parser.add_argument("--time-cap", type=float, default=10.0)
    parser.add_argument(
        "--max-in-flight", type=int, default=0, help="requests in flight at most (the users)"
    )
    parser.add_argument("--single-runs", type=int, default=7)
    args = parser.parse_args(argv)
    if args.sizes.startswith("@"):
        sizes = [int(n) for n in json.loads(Path(args.sizes[1:]).read_text())]
    else:
        sizes = [int(n) for n in args.sizes.split(",") if n]
    if not sizes:
        sys.exit("ceiling: no batch sizes given")
    result = ctranslate2_ceiling(
        args.model_dir,
        sizes,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        concurrency=args.concurrency,
        inter_threads=args.inter_threads,
        intra_threads=args.intra_threads,
        compute_type=args.compute_type,
        time_cap_s=args.time_cap,
        single_runs=args.single_runs,
        max_in_flight=args.max_in_flight or None,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
