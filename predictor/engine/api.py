"""The engine API: what the batcher hands an engine (EngineItem, Sampling) and what comes back
(EngineOutput, through a GenerationListener called from the engine thread)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from predictor.text import TextAssembler

Decode = Callable[[Sequence[str]], str]


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by every sequence of one engine call (CTranslate2 takes them
    per call), so the batcher groups requests by this value. Greedy is the default."""

    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 1.0
    # CTranslate2 4.8 has no per-call seed (set_random_seed is process-wide and read once per
    # worker thread), so a seed is accepted by the OpenAI route but cannot be honoured per request.
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


GREEDY = Sampling()


@dataclass(eq=False)
class EngineItem:
    """One sequence of an engine call. `generated` and `assembler` belong to the request and
    live across calls: a long request may be decoded in chunks, each call continuing from the
    prompt plus what earlier calls generated."""

    prompt_tokens: list[str]
    max_new_tokens: int  # new tokens wanted from this call
    generated: list[str] = field(default_factory=list)  # tokens of earlier calls; this one appends
    assembler: TextAssembler | None = None  # text deltas and stop strings, token by token
    final: bool = True  # this call completes the request: decode its text
    # False (the default): the model's end token ends the sequence (finish reason "eos", the end
    # token counted among the generated tokens); True: exactly max_new_tokens, EOS suppressed.
    ignore_eos: bool = False

    @property
    def per_token(self) -> bool:
        return self.assembler is not None

    @property
    def engine_input(self) -> list[str]:
        return self.prompt_tokens + self.generated if self.generated else self.prompt_tokens


FinishReason = Literal["length", "stop", "eos", "cancelled"]


@dataclass
class EngineOutput:
    text: str
    tokens: list[str] = field(default_factory=list)
    finish_reason: FinishReason = "length"

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    @property
    def stopped_early(self) -> bool:
        return self.finish_reason == "cancelled"


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability given the tokens before it, and the `top` most likely tokens
    at its position (most likely first)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # converted | random | tiny | simulated
    device: str
    compute_type: str
    source: str = ""
    slots: int = 1
    threads_per_slot: int = 0  # 0: the engine decides (GPU)
    lone_batch_threads: int = 0  # threads a batch gets when it runs alone (0: same as per slot)
    background_slots: int = 0  # slots of the low-priority lane for long generations (0: none)

    @property
    def real_weights(self) -> bool:
        return self.kind == "converted"


class GenerationListener(Protocol):
    """Called from the engine thread. Calls between two `flush()`es belong to one step."""

    def on_token(self, index: int, delta: str) -> bool:
        """Sequence `index` (a per-token item) grew by `delta` text; True stops it."""
        ...

    def on_done(self, index: int, output: EngineOutput) -> None:
        """Sequence `index` is finished for this call."""
        ...

    def cancelled(self, index: int) -> bool:
        """Sequence `index` is no longer wanted (asked each step of a per-step engine)."""
        ...

    def flush(self) -> None:
        """The end of a step (or of the call): hand over what the step produced, at once."""
        ...


class Collect:
    """A GenerationListener for callers that run an engine directly (benchmarks, baselines):
    keeps each sequence's output, streams nothing, cancels nothing."""

    def __init__(self, n: int) -> None:
        self.outputs: list[EngineOutput | None] = [None] * n

    def on_token(self, index: int, delta: str) -> bool:
        return False

    def on_done(self, index: int, output: EngineOutput) -> None:
        self.outputs[index] = output

    def cancelled(self, index: int) -> bool:
        return False

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class Placement:
    """Where an engine call runs. `alone`: no other call of its lane runs now, so it may use every
    thread the lane has. `background`: the low-priority lane, without per-step callbacks (no
    per-token items; shorter sequences are answered when the call ends)."""

    alone: bool = False
    background: bool = False


SHARED = Placement()  # an interactive slot, beside other calls


class Engine(Protocol):
    concurrency: int  # calls at once
    background_concurrency: int  # calls at once in the background lane (0: it has none)
    info: ModelInfo

    def tokenize(self, text: str) -> list[str]: ...

    def generate(
        self, items: Sequence[EngineItem], sampling: Sampling, listener: GenerationListener, where: Placement = SHARED
    ) -> None:
        """Blocking. Calls listener.on_done exactly once per item, or raises."""
        ...

    def close(self) -> None: ...
