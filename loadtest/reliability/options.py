"""What each scenario runs with: engine timings, durations, sizes; `Options.quick()` is the
short mode."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass
class SimProfile:
    """SimulatedEngine timing: latency(n, t) = prefill_s + t * (step_s + step_per_seq_s * n)."""

    prefill_s: float
    step_s: float
    step_per_seq_s: float = 0.0
    max_new_tokens: int = 10
    max_batch_size: int = 8

    def batch_seconds(self, n: int) -> float:
        return self.prefill_s + self.max_new_tokens * (self.step_s + self.step_per_seq_s * n)

    @property
    def capacity_rps(self) -> float:
        """Requests/s with every batch full (one batch at a time)."""
        return self.max_batch_size / self.batch_seconds(self.max_batch_size)

    def settings(self) -> dict[str, object]:
        return {
            "engine": "simulated",
            "sim_prefill_s": self.prefill_s,
            "sim_step_s": self.step_s,
            "sim_step_per_seq_s": self.step_per_seq_s,
            "sim_concurrency": 1,
            "max_batch_size": self.max_batch_size,
        }


# Copied into each Options (the command line may change the overload's max_batch_size).
OVERLOAD_PROFILE = SimProfile(prefill_s=0.06, step_s=0.006, max_batch_size=4)
DISCONNECT_PROFILE = SimProfile(prefill_s=0.1, step_s=0.01, max_batch_size=8)


@dataclass
class Options:
    out_dir: Path = Path("bench-results")
    model_dir: Path = Path("models/opt-125m")
    # overload: capacity 4 / 0.12 s = 33 req/s, so 11x is ~370 req/s. The server's own 503 path
    # costs CPU on its one event loop (~700 503/s on a busy 2-core machine): 10x a faster engine
    # would measure the machine running out of CPU, not ferry's admission control.
    overload_s: float = 60.0
    overload_factor: float = 11.0
    overload_profile: SimProfile = field(default_factory=lambda: replace(OVERLOAD_PROFILE))
    overload_deadline_s: float = 2.0
    overload_queue: int = 32
    peak_s: float = 10.0  # the closed loop that measures the unloaded peak first
    # faults
    fault_every: int = 10  # the simulated engine raises in every 10th batch
    fault_requests: int = 400  # per batch size; raised to 3 x fault_every full batches if fewer
    # drain
    drain_grace_s: float = 10.0
    drain_steady_s: float = 5.0
    drain_users: int = 16
    # disconnects: 8 / 0.2 s = 40 req/s, slow enough that a queue forms behind every batch
    disconnect_s: float = 20.0
    disconnect_users: int = 16  # keepers; as many leavers
    disconnect_profile: SimProfile = field(default_factory=lambda: replace(DISCONNECT_PROFILE))
    # soak (real CTranslate2 model)
    soak_s: float = 600.0
    soak_warmup_s: float = 60.0
    soak_fraction: float = 0.8
    soak_capacity_s: float = 15.0  # the closed loop that measures capacity first
    soak_users: int = 40  # in that closed loop
    inter_threads: int = 2  # CTranslate2: batches computed at once
    intra_threads: int = 1  # CTranslate2: threads per batch
    # slow clients: ferry's default read timeouts; the cap filled with stalled sockets
    slow_cap: int = 64
    slow_header_timeout_s: float = 10.0
    slow_body_timeout_s: float = 20.0
    slow_grace_s: float = 5.0
    # input classes
    inputs_model_dir: Path = Path("models/tiny")
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> Options:
        values: dict[str, Any] = {
            "overload_s": 10.0,
            "peak_s": 5.0,
            "fault_requests": 100,
            "drain_steady_s": 2.0,
            "disconnect_s": 5.0,
            "soak_s": 20.0,
            "soak_warmup_s": 5.0,
            "soak_capacity_s": 6.0,
            "slow_header_timeout_s": 2.0,
            "slow_body_timeout_s": 3.0,
        }
        values.update(overrides)
        return cls(**values)
