"""Engines: what computes a batch. Blocking calls, run in ferry's own thread pool; no asyncio here.

An engine reports progress through a `GenerationListener` from its own thread:
`on_token` for every generated token (its return value stops that sequence: client gone),
and `on_done` as soon as one sequence has all its tokens, so a short request in a batch of
long ones is answered early.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from predictor.models import read_manifest
from predictor.tokenizer import Tokenizer, shared_tokenizer

log = logging.getLogger("ferry.engine")


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


@dataclass
class EngineItem:
    prompt_tokens: list[str]
    max_new_tokens: int
    stream: bool = False  # its tokens are wanted as they come


@dataclass
class EngineOutput:
    text: str
    tokens: list[str] = field(default_factory=list)
    stopped_early: bool = False  # the listener asked to stop (cancelled, deadline)

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # converted | random | tiny | simulated
    device: str
    compute_type: str
    source: str = ""

    @property
    def real_weights(self) -> bool:
        return self.kind == "converted"


class GenerationListener(Protocol):
    def on_token(self, index: int, token: str) -> bool:
        """A new token for sequence `index`; return True to stop that sequence."""
        ...

    def on_done(self, index: int, output: EngineOutput) -> None:
        """Sequence `index` is finished (all tokens, or stopped)."""
        ...


class Engine(Protocol):
    concurrency: int
    info: ModelInfo

    def tokenize(self, text: str) -> list[str]: ...

    def generate(
        self, items: Sequence[EngineItem], sampling: Sampling, listener: GenerationListener
    ) -> None:
        """Blocking. Calls listener.on_done exactly once per item, or raises."""
        ...

    def close(self) -> None: ...


class _SequenceTracker:
    """Per-call bookkeeping shared by both engines: counts tokens, answers each sequence once."""

    def __init__(
        self, items: Sequence[EngineItem], listener: GenerationListener, tokenizer: Tokenizer
    ) -> None:
        self.items = items
        self.listener = listener
        self.tokenizer = tokenizer
        self.tokens: list[list[str]] = [[] for _ in items]
        self.done = [False] * len(items)

    def step(self, index: int, token: str) -> bool:
        """Returns True when the sequence must stop (finished or abandoned)."""
        if self.done[index]:
            return True
        tokens = self.tokens[index]
        tokens.append(token)
        stop = self.listener.on_token(index, token)
        if stop or len(tokens) >= self.items[index].max_new_tokens:
            self.finish(index, stopped_early=stop)
            return True
        return False

    def finish(self, index: int, stopped_early: bool = False) -> None:
        if self.done[index]:
            return
        self.done[index] = True
        tokens = self.tokens[index]
        output = EngineOutput(self.tokenizer.decode(tokens), tokens, stopped_early)
        self.listener.on_done(index, output)

    def finish_all(self) -> None:
        for index in range(len(self.items)):
            self.finish(index)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def resolve_compute_type(compute_type: str, device: str) -> str:
    if compute_type != "auto":
        return compute_type
    return "int8_float16" if device == "cuda" else "int8"


class CTranslate2Engine:
    """OPT (or any CTranslate2 decoder-only model) through `Generator.generate_batch`."""

    def __init__(
        self,
        model_dir: Path,
        *,
        name: str,
        device: str = "auto",
        device_index: int = 0,
        compute_type: str = "auto",
        inter_threads: int = 1,
        intra_threads: int = 0,
    ) -> None:
        import ctranslate2

        manifest = read_manifest(model_dir)
        device = resolve_device(device)
        compute_type = resolve_compute_type(compute_type, device)
        self._generator = ctranslate2.Generator(
            str(model_dir),
            device=device,
            device_index=device_index,
            compute_type=compute_type,
            inter_threads=inter_threads,
            intra_threads=intra_threads,
        )
        self.concurrency = inter_threads
        self.tokenizer = shared_tokenizer()
        self.info = ModelInfo(
            name=name,
            kind=str(manifest.get("kind", "converted")),
            device=device,
            compute_type=self._generator.compute_type,
            source=str(manifest.get("source", "")),
        )
        self.max_positions = 2048

    def tokenize(self, text: str) -> list[str]:
        return self.tokenizer.encode(text)

    def generate(
        self, items: Sequence[EngineItem], sampling: Sampling, listener: GenerationListener
    ) -> None:
        tracker = _SequenceTracker(items, listener, self.tokenizer)
        longest = max(item.max_new_tokens for item in items)
        kwargs: dict[str, Any] = {}
        if not sampling.greedy:
            kwargs.update(
                sampling_topk=sampling.top_k,
                sampling_topp=sampling.top_p,
                sampling_temperature=sampling.temperature,
            )

        def on_step(step: Any) -> bool:
            return tracker.step(step.batch_id, step.token)

        # The per-step callback is what answers short requests early, streams tokens and stops
        # abandoned sequences; each call takes the GIL from the engine thread, which waits behind
        # a busy event loop. A batch of equal lengths with no stream runs without it.
        per_step = any(item.stream or item.max_new_tokens != longest for item in items)
        # min_length = max_length: exactly the requested count (EOS cannot end it early);
        # shorter sequences are stopped through the callback when their own count is reached.
        results = self._generator.generate_batch(
            [item.prompt_tokens for item in items],
            max_length=longest,
            min_length=longest,
            include_prompt_in_result=False,
            beam_size=1,
            callback=on_step if per_step else None,
            **kwargs,
        )
        if not per_step:
            for index, result in enumerate(results):
                for token in result.sequences[0]:
                    if tracker.step(index, token):
                        break
        tracker.finish_all()

    def close(self) -> None:
        self._generator.unload_model()


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
    where the engine is no longer the bottleneck."""

    def __init__(
        self,
        *,
        name: str,
        latency: LatencyModel | None = None,
        concurrency: int = 1,
        fail_every: int = 0,
    ) -> None:
        self.latency = latency or LatencyModel()
        self.concurrency = concurrency
        self.fail_every = fail_every  # fault injection for reliability tests: every Nth batch raises
        self._calls = itertools.count(1)
        self.tokenizer = shared_tokenizer()
        self.info = ModelInfo(name=name, kind="simulated", device="simulated", compute_type="none")
        self._slots = threading.Semaphore(concurrency)  # like CUDA streams: extra calls wait

    def tokenize(self, text: str) -> list[str]:
        return self.tokenizer.encode(text)

    @staticmethod
    def token_for(prompt_tokens: Sequence[str], step: int) -> str:
        # Deterministic and prompt-dependent, so batching can be shown not to change answers.
        words = [t for t in prompt_tokens[1:] if t.startswith("Ġ")] or ["Ġecho"]
        return words[step % len(words)]

    def generate(
        self, items: Sequence[EngineItem], sampling: Sampling, listener: GenerationListener
    ) -> None:
        tracker = _SequenceTracker(items, listener, self.tokenizer)
        call = next(self._calls)
        with self._slots:
            _sleep(self.latency.prefill_s)
            if self.fail_every and call % self.fail_every == 0:
                raise RuntimeError(f"injected fault in simulated batch {call}")
            active = list(range(len(items)))
            step = 0
            while active:
                _sleep(self.latency.step_s + self.latency.step_per_seq_s * len(active))
                active = [
                    i
                    for i in active
                    if not tracker.step(i, self.token_for(items[i].prompt_tokens, step))
                ]
                step += 1
        tracker.finish_all()

    def close(self) -> None:
        pass


def _sleep(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)  # releases the GIL
