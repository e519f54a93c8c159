"""The engine's limit at n requests in flight: CTranslate2 called directly, with perfectly formed
batches, in the best of its configurations. Independent of anything a server did: no replay of
the batches a server formed, so a server that forms poor batches cannot lower its yardstick.

Configurations, each measured in this process for `time_cap_s`:
  - 1 call of n at a time, every core on it (inter 1, intra = cores);
  - k concurrent calls of n/k, each with cores/k threads (inter k, intra cores/k), for k = 2
    (and more when the machine has the cores).
    python -m loadtest.engine_limit --model-dir models/opt-125m --in-flight 40   # prints JSON

The batch-1 latency (the 1-user yardstick): with `--single-calls-on-stdin` it loads the batch-1
configuration (1 call, every core), prints `ready`, and then for each line `n` on stdin times n
calls of one request and prints their seconds as a JSON list: the bench interleaves these with
a server's own 1-user requests (loadtest/one_user.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from predictor.engine import cpu_cores, resolve_compute_type, resolve_device
from predictor.tokenizer import shared_tokenizer


@dataclass
class ConfigResult:
    """One configuration of calls x threads, measured."""

    config: str  # "calls x batch size", e.g. "2 x 20"
    calls: int
    threads_per_call: int
    rps: float


@dataclass
class EngineLimit:
    """The best of the configurations at `in_flight` requests."""

    in_flight: int
    cores: int
    rps: float
    best_config: str
    configs: list[ConfigResult]

    @classmethod
    def from_json(cls, text: str) -> EngineLimit:
        data = json.loads(text)
        data["configs"] = [ConfigResult(**config) for config in data["configs"]]
        return cls(**data)


@dataclass(frozen=True)
class Workload:
    """What every configuration is asked: `in_flight` copies of one prompt, exactly
    `max_new_tokens` each."""

    model_dir: Path
    in_flight: int
    prompt: str
    max_new_tokens: int
    compute_type: str


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _batch_runner(work: Workload, calls: int, threads_per_call: int) -> tuple[Callable[[int], None], Any]:
    """A function that generates one batch of n prompts, and the generator behind it."""
    import ctranslate2

    device = resolve_device("auto")
    generator = ctranslate2.Generator(
        str(work.model_dir),
        device=device,
        compute_type=resolve_compute_type(work.compute_type, device),
        inter_threads=calls,
        intra_threads=threads_per_call,
    )
    tokens = shared_tokenizer().encode(work.prompt)
    options = {
        "max_length": work.max_new_tokens,
        "min_length": work.max_new_tokens,
        "include_prompt_in_result": False,
        "beam_size": 1,
    }

    def run(n: int) -> None:
        generator.generate_batch([tokens] * n, **options)

    return run, generator


def _throughput(run: Callable[[int], None], sizes: list[int], time_cap_s: float) -> float:
    """Requests/s with one thread per call, each generating its batch size again and again."""
    done = [0] * len(sizes)
    stop_at = time.perf_counter() + time_cap_s

    def worker(i: int) -> None:
        while time.perf_counter() < stop_at:
            run(sizes[i])
            done[i] += sizes[i]

    run(max(sizes))  # warm-up at the measured size
    started = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(len(sizes))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(done) / (time.perf_counter() - started)


def measure_config(work: Workload, *, calls: int, threads_per_call: int, time_cap_s: float) -> ConfigResult:
    sizes = [s for s in split(work.in_flight, calls) if s > 0]
    run, generator = _batch_runner(work, calls, threads_per_call)
    rps = _throughput(run, sizes, time_cap_s)
    generator.unload_model()
    return ConfigResult(
        config=f"{len(sizes)} x {sizes[0]}" + (f"..{sizes[-1]}" if sizes[-1] != sizes[0] else ""),
        calls=len(sizes),
        threads_per_call=threads_per_call,
        rps=rps,
    )


def engine_limit(
    model_dir: Path,
    in_flight: int,
    *,
    prompt: str = "Hello World, what is your name dog?",
    max_new_tokens: int = 10,
    compute_type: str = "auto",
    time_cap_s: float = 5.0,
) -> EngineLimit:
    work = Workload(model_dir, in_flight, prompt, max_new_tokens, compute_type)
    cores = cpu_cores() if resolve_device("auto") == "cpu" else 1
    call_counts = [k for k in (1, 2, 4) if k <= max(cores, 1) and k <= in_flight]
    configs = [
        measure_config(work, calls=k, threads_per_call=max(1, cores // k), time_cap_s=time_cap_s)
        for k in call_counts
    ]
    best = max(configs, key=lambda c: c.rps)
    return EngineLimit(in_flight=in_flight, cores=cores, rps=best.rps, best_config=best.config, configs=configs)


def serve_single_calls(work: Workload, cores: int) -> None:
    """Batch-1 calls with every core, `n` at a time as stdin asks (see the module's doc)."""
    run, generator = _batch_runner(work, 1, cores)
    run(1)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        latencies = []
        for _ in range(int(line)):
            started = time.perf_counter()
            run(1)
            latencies.append(time.perf_counter() - started)
        print(json.dumps(latencies), flush=True)
    generator.unload_model()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("models/opt-125m"))
    parser.add_argument("--in-flight", type=int, default=40)
    parser.add_argument("--prompt", default="Hello World, what is your name dog?")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--compute-type", default="auto")
    parser.add_argument("--time-cap", type=float, default=5.0)
    parser.add_argument("--single-calls-on-stdin", action="store_true", help="see the module's doc")
    args = parser.parse_args(argv)
    if args.single_calls_on_stdin:
        work = Workload(args.model_dir, 1, args.prompt, args.max_new_tokens, args.compute_type)
        serve_single_calls(work, cpu_cores() if resolve_device("auto") == "cpu" else 1)
        return
    result = engine_limit(
        args.model_dir,
        args.in_flight,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        compute_type=args.compute_type,
        time_cap_s=args.time_cap,
    )
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
