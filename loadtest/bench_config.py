"""`make bench`: the run's configuration and its log line (see loadtest/bench.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from predictor.settings import Settings

REFERENCE_PROMPT = "Hello World, what is your name dog?"
FULL_LEVELS = [1, 2, 4, 8, 16, 32, 40, 64, 128]
QUICK_LEVELS = [1, 40]
SIM_TARGET_RPS = 404.0  # the write-up's Rust server


DEFAULT_GATHER_CAP_S = float(Settings.model_fields["max_batch_wait_s"].default)


@dataclass
class BenchConfig:
    mode: str
    model_dir: Path
    levels: list[int]
    warmup_s: float
    measure_s: float
    reps: int
    max_warmup_s: float
    out_dir: Path
    plots_dir: Path
    inter_threads: int = 2  # the baselines' CTranslate2 threads (ferry uses its own `auto` plan)
    intra_threads: int = 1
    compute_type: str = "auto"
    max_batch_size: int = 50
    ferry_wait_s: float = DEFAULT_GATHER_CAP_S  # ferry as shipped: adaptive gathering on
    reference_users: int = 40
    prompt: str = REFERENCE_PROMPT
    max_new_tokens: int = 10
    servers: list[str] = field(default_factory=lambda: ["ferry", "naive", "timer", "ferry-sim"])
    wait_variant_s: float = 0.0  # "ferry-no-gather": FERRY_MAX_BATCH_WAIT_S=0, at 1 and 40 users
    protocols: bool = False  # also V1 and V2 REST at the reference concurrency
    locust: bool = False  # also the write-up's own tool against ferry at the reference
    mixed: bool = False  # also 80 % 10-token / 20 % 100-token requests (ferry and timer batcher)
    streaming: bool = False  # also half streamed OpenAI completions, half /generate (ferry)

    def repetitions(self, users: int) -> int:
        return self.reps if users == self.reference_users else 1


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)
