"""A GIL-free stand-in for a GPU: the server measured where the engine is no longer the
bottleneck."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from predictor.engine.api import SHARED, EngineItem, GenerationListener, ModelInfo, Placement, Sampling, TokenLogprob
from predictor.engine.tracker import SequenceTracker
from predictor.tokenizer import EOS, shared_tokenizer


@dataclass(frozen=True)
class LatencyModel:
    """latency(batch n, new tokens t) = prefill_s + t * (step_s + step_per_seq_s * n)"""

    prefill_s: float = 0.002
    step_s: float = 0.0015
    step_per_seq_s: float = 0.00001

    def batch_seconds(self, batch: int, new_tokens: int) -> float:
        return self.prefill_s + new_tokens * (self.step_s + self.step_per_seq_s * batch)


class SimulatedEngine:
    """A GIL-free stand-in for a GPU: sleeps as the latency model says, one step at a time,
    emitting deterministic tokens through the same listener, so the server can be measured
    where the engine is no longer the bottleneck. Steps sleep to absolute deadlines, so the
    sleeps' own overshoot is not charged to the server."""

    def __init__(
        self,
        *,
        name: str,
        latency: LatencyModel | None = None,
        concurrency: int = 1,
        background_concurrency: int = 0,
        fail_every: int = 0,
        eos_after: int = 0,
    ) -> None:
        self.latency = latency or LatencyModel()
        self.concurrency = concurrency
        # A background lane with its own slots; here it only shares the API (no CPU priority to
        # give way with: the simulated device sleeps).
        self.background_concurrency = background_concurrency
        self.fail_every = fail_every  # fault injection for reliability tests: every Nth batch raises
        # A sequence that does not ignore EOS emits the end token as its eos_after-th generated
        # token (0: never, like random weights), so EOS handling is testable without weights.
        self.eos_after = eos_after
        self.end_token = EOS
        self._calls = itertools.count(1)
        self.tokenizer = shared_tokenizer()
        self.info = ModelInfo(name=name, kind="simulated", device="simulated", compute_type="none", slots=concurrency)
        self._slots = threading.Semaphore(concurrency)  # like CUDA streams: extra calls wait
        self._background_slots = threading.Semaphore(max(background_concurrency, 1))

    def tokenize(self, text: str) -> list[str]:
        return self.tokenizer.encode(text)

    def logprobs(self, sequences: Sequence[Sequence[str]], top: int) -> list[list[TokenLogprob]]:
        """Deterministic stand-ins: every token certain (log-probability 0), itself the top one."""
        return [[TokenLogprob(t, 0.0, ((t, 0.0),)[:top]) for t in sequence[1:]] for sequence in sequences]

    @staticmethod
    def words_of(prompt_tokens: Sequence[str]) -> list[str]:
        # Deterministic and prompt-dependent, so batching can be shown not to change answers.
        return [t for t in prompt_tokens[1:] if t.startswith("Ġ")] or ["Ġecho"]

    @classmethod
    def token_for(cls, prompt_tokens: Sequence[str], step: int) -> str:
        words = cls.words_of(prompt_tokens)
        return words[step % len(words)]

    def _token(self, item: EngineItem, cycle: Sequence[str], position: int) -> str:
        """The token at `position` (0-based over the whole request) of a sequence."""
        if self.eos_after and not item.ignore_eos and position == self.eos_after - 1:
            return self.end_token
        return cycle[position % len(cycle)]

    def generate(
        self, items: Sequence[EngineItem], sampling: Sampling, listener: GenerationListener, where: Placement = SHARED
    ) -> None:
        tracker = SequenceTracker(items, listener, self.tokenizer.decode)  # ferry's work, not the device's
        call = next(self._calls)
        _precise_sleeps()
        longest = max(item.max_new_tokens for item in items)
        # Like CTranslate2Engine: per-step work only when an item needs it, never in the background.
        per_step = not where.background and any(item.per_token or item.max_new_tokens != longest for item in items)
        with self._background_slots if where.background else self._slots:
            deadline = time.monotonic() + self.latency.prefill_s
            # The simulated device's own work (its answers) is done while it "runs".
            words = [self.words_of(item.prompt_tokens) for item in items]
            if self.fail_every and call % self.fail_every == 0:
                _sleep_until(deadline)
                raise RuntimeError(f"injected fault in simulated batch {call}")
            if not per_step:  # one wait for the whole call
                answers = [self._tokens(item, words[i], longest) for i, item in enumerate(items)]
                _sleep_until(deadline + longest * (self.latency.step_s + self.latency.step_per_seq_s * len(items)))
                for i, tokens in enumerate(answers):
                    tracker.complete(i, tokens)
            else:
                _sleep_until(deadline)
                self._run_steps(items, words, tracker, listener, deadline)
        tracker.finish_all()

    def _tokens(self, item: EngineItem, cycle: Sequence[str], count: int) -> list[str]:
        """The next `count` tokens of a sequence (computed while the device "runs")."""
        first = len(item.generated)
        return [self._token(item, cycle, first + k) for k in range(count)]

    def _run_steps(
        self,
        items: Sequence[EngineItem],
        words: list[list[str]],
        tracker: SequenceTracker,
        listener: GenerationListener,
        deadline: float,
    ) -> None:
        active = list(range(len(items)))
        while active:
            deadline += self.latency.step_s + self.latency.step_per_seq_s * len(active)
            _sleep_until(deadline)
            still = []
            for i in active:
                token = self._token(items[i], words[i], len(items[i].generated))
                if not tracker.step(i, token):
                    still.append(i)
            active = still
            listener.flush()

    def close(self) -> None:
        pass


_precise = threading.local()
SPIN_S = 0.0003  # the last stretch of a wait is spun (see _sleep_until)


def _precise_sleeps() -> None:
    """Linux lets a sleeping thread wake up to 50 us late (timer slack) to batch wake-ups; the
    simulated engine stands in for a device that finishes on time, so its threads ask for 1 ns."""
    if getattr(_precise, "set", False):
        return
    _precise.set = True
    try:
        import ctypes

        pr_set_timerslack = 29
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_timerslack, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: sleeps keep the platform's precision


def _sleep_until(deadline: float) -> None:
    """Returns at `deadline`, not a wake-up later: sleeps until SPIN_S before it (releasing the
    GIL), then yields until it. A thread woken from a sleep runs 50-150 us late on a loaded
    or virtual machine; a device's completion (CUDA's default is to spin on it) is not."""
    remaining = deadline - SPIN_S - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
    while time.monotonic() < deadline:
        time.sleep(0)  # releases the GIL between checks: the event loop is never held up
