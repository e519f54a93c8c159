"""A fake engine held by events: deterministic batcher tests with no sleeps."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from predictor.engine import SHARED, EngineItem, GenerationListener, ModelInfo, Placement, Sampling, SequenceTracker

WAIT_S = 10.0  # upper bound for any event wait; a test that needs it has failed


@dataclass
class Call:
    items: list[EngineItem]
    sampling: Sampling
    hold_at_step: int
    alone: bool = False
    started: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    steps_run: int = 0

    @property
    def sizes(self) -> int:
        return len(self.items)


class GatedEngine:
    """Each generate() call emits one token per step for every live sequence and stops at
    `hold_at_step` until the test sets `call.release`. Text is the prompt reversed, so answers
    are checkable; `fail_calls` makes the listed call numbers raise."""

    def __init__(self, concurrency: int = 1, hold_at_step: int = 0) -> None:
        self.concurrency = concurrency
        self.background_concurrency = 0  # no background lane
        self.hold_at_step = hold_at_step
        self.info = ModelInfo(name="fake", kind="tiny", device="cpu", compute_type="none")
        self.tokenizer = self  # the batcher decodes text through engine.tokenizer.decode
        self.calls: list[Call] = []
        self.call_started = threading.Condition()
        self.fail_calls: set[int] = set()
        self.auto_release = False

    def tokenize(self, text: str) -> list[str]:
        return ["</s>", *text.split()]

    def close(self) -> None:
        pass

    def wait_for_calls(self, n: int) -> list[Call]:
        with self.call_started:
            assert self.call_started.wait_for(lambda: len(self.calls) >= n, WAIT_S), (
                f"expected {n} engine calls, saw {len(self.calls)}"
            )
            return self.calls[:n]

    def release_all(self) -> None:
        """Lets every held call go, and every later one run through without holding."""
        self.auto_release = True
        for call in self.calls:
            call.release.set()

    def decode(self, tokens: Sequence[str]) -> str:
        return " ".join(tokens)

    def generate(
        self, items: Sequence[EngineItem], sampling: Sampling, listener: GenerationListener, where: Placement = SHARED
    ) -> None:
        call = Call(list(items), sampling, self.hold_at_step, where.alone)
        with self.call_started:
            number = len(self.calls)
            self.calls.append(call)
            self.call_started.notify_all()
        call.started.set()
        tracker = SequenceTracker(items, listener, self.decode)
        longest = max(item.max_new_tokens for item in items)
        try:
            for step in range(longest):
                if step == call.hold_at_step and not self.auto_release:
                    call.held.set()
                    assert call.release.wait(WAIT_S), "test never released the engine"
                if number in self.fail_calls:
                    raise RuntimeError(f"injected failure in call {number}")
                for i, item in enumerate(items):
                    if not tracker.done[i]:
                        tracker.step(i, f"{item.prompt_tokens[-1]}{len(item.generated)}")
                call.steps_run = step + 1  # before the flush hands the step's answers to the loop
                listener.flush()
                if all(tracker.done):
                    break
            tracker.finish_all()
        finally:
            call.finished.set()
