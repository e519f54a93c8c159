"""Engines: what computes a batch. Blocking calls, run in ferry's own thread pool; no asyncio here.

An engine reports progress through a `GenerationListener` from its own thread:
`on_token` for every generated token (its return value stops that sequence: client gone),
and `on_done` as soon as one sequence has all its tokens, so a short request in a batch of
long ones is answered early.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from predictor.build_model import read_manifest
from predictor.text import TextAssembler
from predictor.tokenizer import EOS, shared_tokenizer

Decode = Callable[[Sequence[str]], str]

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


class Engine(Protocol):
    concurrency: int
    info: ModelInfo

    def tokenize(self, text: str) -> list[str]: ...

    def generate(
        self,
        items: Sequence[EngineItem],
        sampling: Sampling,
        listener: GenerationListener,
        alone: bool = False,
    ) -> None:
        """Blocking. Calls listener.on_done exactly once per item, or raises. `alone`: no other
        call runs now, so this one may use every thread the engine has."""
        ...

    def close(self) -> None: ...


class _SequenceTracker:
    """Per-call bookkeeping shared by the engines: counts tokens, feeds per-token items'
    assemblers, answers each sequence once, and flushes the listener once per step."""

    def __init__(
        self, items: Sequence[EngineItem], listener: GenerationListener, decode: Decode, end_token: str = EOS
    ) -> None:
        self.items = items
        self.listener = listener
        self.decode = decode
        self.end_token = end_token
        self.start = [len(item.generated) for item in items]
        self.done = [False] * len(items)
        self.live = len(items)
        self._step_calls = 0
        self._step_live = 0  # sequences live when the current step began

    def step(self, index: int, token: str) -> bool:
        """Returns True when the sequence must stop (finished, stop string or abandoned)."""
        if self.done[index]:
            return True
        item = self.items[index]
        item.generated.append(token)
        reason: FinishReason | None = None
        if token == self.end_token and not item.ignore_eos:
            reason = "eos"
        elif item.assembler is not None:
            delta = item.assembler.push(token)
            if item.assembler.stopped:
                reason = "stop"
            elif self.listener.on_token(index, delta):
                reason = "cancelled"
        elif self.listener.cancelled(index):
            reason = "cancelled"
        if reason is None and len(item.generated) - self.start[index] >= item.max_new_tokens:
            reason = "length"
        if reason is not None:
            self.finish(index, reason)
        return reason is not None

    def complete(self, index: int, tokens: Sequence[str]) -> None:
        """A sequence's tokens of this call, all at once (engines run without per-step callbacks
        when no item needs them: no per-token Python while the batch runs). A sequence that
        ends on the end token, or short of its count, ended at EOS."""
        if self.done[index]:
            return
        item = self.items[index]
        tokens = list(tokens[: item.max_new_tokens])
        reason: FinishReason = "length"
        if not item.ignore_eos:
            if self.end_token in tokens:
                tokens = tokens[: tokens.index(self.end_token) + 1]
                reason = "eos"
            elif len(tokens) < item.max_new_tokens:
                reason = "eos"
        item.generated.extend(tokens)
        self.finish(index, reason)

    def ended_by_engine(self, index: int) -> None:
        """After a per-step call: a sequence the engine ended short of its count without the
        tracker stopping it ended at EOS (the engine stops only there or at max_length)."""
        if self.done[index]:
            return
        item = self.items[index]
        if item.ignore_eos or len(item.generated) - self.start[index] >= item.max_new_tokens:
            self.finish(index, "length")
            return
        if not item.generated or item.generated[-1] != self.end_token:
            item.generated.append(self.end_token)  # counted as the fast path counts it
        self.finish(index, "eos")

    def step_callback(self, index: int, token: str) -> bool:
        """`step` for engines that call back once per live sequence per step (CTranslate2):
        flushes when every sequence live at the step's start has been seen."""
        if self._step_calls == 0:
            self._step_live = self.live
        stop = self.step(index, token)
        self._step_calls += 1
        if self._step_calls >= self._step_live:
            self._step_calls = 0
            self.listener.flush()
        return stop

    def finish(self, index: int, reason: FinishReason = "length") -> None:
        if self.done[index]:
            return
        self.done[index] = True
        self.live -= 1
        item = self.items[index]
        if item.assembler is not None:
            if (reason == "length" and item.final) or reason == "eos":
                item.assembler.finish()  # what was held back (half a character, a partial stop)
            text = item.assembler.text
        elif item.final or reason != "length":
            text = self.decode(item.generated)
        else:
            text = ""  # more chunks follow; the last one decodes every token at once
        self.listener.on_done(index, EngineOutput(text, item.generated, reason))

    def finish_all(self) -> None:
        for index in range(len(self.items)):
            self.finish(index)
        self.listener.flush()


class _Renumbered:
    """A listener for a part of a call: its sequence i is the whole call's `indices[i]`."""

    def __init__(self, listener: GenerationListener, indices: Sequence[int]) -> None:
        self.listener = listener
        self.indices = indices

    def on_token(self, index: int, delta: str) -> bool:
        return self.listener.on_token(self.indices[index], delta)

    def on_done(self, index: int, output: EngineOutput) -> None:
        self.listener.on_done(self.indices[index], output)

    def cancelled(self, index: int) -> bool:
        return self.listener.cancelled(self.indices[index])

    def flush(self) -> None:
        self.listener.flush()


LOGPROB_TOKEN_BUDGET = 2048  # positions (padded) per forward_batch call when scoring


def _by_token_budget(sequences: list[list[str]], budget: int) -> list[list[list[str]]]:
    """Consecutive groups whose padded size (count x longest) stays within `budget` (a longer
    sequence goes alone)."""
    groups: list[list[list[str]]] = []
    current: list[list[str]] = []
    longest = 0
    for sequence in sequences:
        size = max(longest, len(sequence)) * (len(current) + 1)
        if current and size > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(sequence)
        longest = max(longest, len(sequence))
    if current:
        groups.append(current)
    return groups


def _eos_groups(items: Sequence[EngineItem]) -> list[list[int]] | None:
    """CTranslate2 takes EOS handling per call. The batcher never mixes the two in one call;
    a direct caller that does gets its call split in two (None: nothing to split)."""
    ignore = items[0].ignore_eos
    if all(item.ignore_eos == ignore for item in items):
        return None
    return [[i for i, item in enumerate(items) if item.ignore_eos == flag] for flag in (False, True)]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def resolve_compute_type(compute_type: str, device: str) -> str:
    if compute_type != "auto":
        return compute_type
    return "int8_float16" if device == "cuda" else "int8"


def cpu_cores() -> int:
    """The cores this process may use: its CPU affinity, bounded by a cgroup CPU quota (a pod's
    CPU limit shows as a quota, not as fewer CPUs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota else cores


def _cgroup_cpu_quota() -> int:
    """ceil(quota / period) from cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; 0 when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return math.ceil(int(quota) / int(period))
        return 0
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return math.ceil(quota_us / period_us) if quota_us > 0 else 0
    except (OSError, ValueError):
        return 0


@dataclass(frozen=True)
class ThreadPlan:
    """How CTranslate2's threads are laid out: `slots` calls at once of `threads_per_slot`
    each, and, when `lone_threads` is set, a second generator on the same weights whose single
    call gets every core: a request alone is not held to one slot's share."""

    slots: int
    threads_per_slot: int
    lone_threads: int = 0

    @classmethod
    def choose(cls, device: str, inter: int | None, intra: int | None, cores: int) -> ThreadPlan:
        """`None` is `auto`. On CPU: two slots that split the cores (measured on 2 cores, 40 in
        flight: 2 calls of 20 with 1 thread each beat 1 call of 40 with 2 threads in every run),
        plus an all-core generator for a batch that runs alone (batch 1 is fastest with every
        core). On GPU: one slot (one stream); the CPU threads only feed it."""
        if device == "cuda":
            return cls(inter or 1, intra or 1)
        if inter is None:
            inter = 2 if cores >= 2 else 1
        if intra is None:
            intra = max(1, cores // inter)
            lone = cores if inter > 1 and cores > intra else 0
            return cls(inter, intra, lone)
        return cls(inter, intra)


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
        inter_threads: int | None = None,
        intra_threads: int | None = None,
    ) -> None:
        import ctranslate2

        manifest = read_manifest(model_dir)
        device = resolve_device(device)
        compute_type = resolve_compute_type(compute_type, device)
        self.plan = ThreadPlan.choose(device, inter_threads, intra_threads, cpu_cores())

        def generator(inter: int, intra: int) -> Any:
            return ctranslate2.Generator(
                str(model_dir),
                device=device,
                device_index=device_index,
                compute_type=compute_type,
                inter_threads=inter,
                intra_threads=intra,
            )

        self._generator = generator(self.plan.slots, self.plan.threads_per_slot)
        # About 130 MB more for OPT-125m int8; measured not to slow the other when used in turn.
        self._lone = generator(1, self.plan.lone_threads) if self.plan.lone_threads else None
        self.concurrency = self.plan.slots
        self.tokenizer = shared_tokenizer()
        self.info = ModelInfo(
            name=name,
            kind=str(manifest.get("kind", "converted")),
            device=device,
            compute_type=self._generator.compute_type,
            source=str(manifest.get("source", "")),
            slots=self.plan.slots,
            threads_per_slot=self.plan.threads_per_slot,
            lone_batch_threads=self.plan.lone_threads,
        )
        self.max_positions = 2048
        self.model_dir = model_dir
        self.end_token = str(self._generator_config(model_dir).get("eos_token") or EOS)
        self._vocab: tuple[list[str], dict[str, int]] | None = None

    @staticmethod
    def _generator_config(model_dir: Path) -> dict[str, Any]:
        """CTranslate2's config.json (bos/eos/unk tokens); {} when absent."""
        path = model_dir / "config.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def tokenize(self, text: str) -> list[str]:
        return self.tokenizer.encode(text)

    def logprobs(self, sequences: Sequence[Sequence[str]], top: int) -> list[list[TokenLogprob]]:
        """Blocking. Per sequence, every token after the first: its log-probability given the
        ones before and the `top` likeliest tokens there, from forward passes over groups of the
        sequences (CTranslate2's forward_batch: the same numbers as score_batch, plus the
        alternatives), each group within LOGPROB_TOKEN_BUDGET padded positions."""
        import numpy as np

        vocabulary, ids = self._vocabulary()
        results: list[list[TokenLogprob]] = []
        for batch in _by_token_budget([list(sequence) for sequence in sequences], LOGPROB_TOKEN_BUDGET):
            # [batch, longest, vocabulary] float32: about 200 kB per position for OPT's vocabulary,
            # so a call holds at most LOGPROB_TOKEN_BUDGET positions.
            log_probs = np.asarray(self._generator.forward_batch(batch, return_log_probs=True))
            results.extend(self._scored(batch, log_probs, vocabulary, ids, top))
        return results

    @staticmethod
    def _scored(
        batch: list[list[str]], log_probs: Any, vocabulary: list[str], ids: dict[str, int], top: int
    ) -> list[list[TokenLogprob]]:
        import numpy as np

        results: list[list[TokenLogprob]] = []
        for b, sequence in enumerate(batch):
            scored: list[TokenLogprob] = []
            rows = log_probs[b]
            for position in range(1, len(sequence)):
                row = rows[position - 1]
                token = sequence[position]
                best: tuple[tuple[str, float], ...] = ()
                if top > 0:
                    picked = np.argpartition(-row, top)[:top]
                    picked = picked[np.argsort(-row[picked], kind="stable")]
                    best = tuple((vocabulary[i], float(row[i])) for i in picked)
                scored.append(TokenLogprob(token, float(row[ids.get(token, ids.get("<unk>", 3))]), best))
            results.append(scored)
        return results

    def _vocabulary(self) -> tuple[list[str], dict[str, int]]:
        if self._vocab is None:
            path = self.model_dir / "vocabulary.json"
            if path.is_file():
                tokens = [str(t) for t in json.loads(path.read_text())]
            else:
                tokens = (self.model_dir / "vocabulary.txt").read_text().split("\n")
            self._vocab = (tokens, {token: i for i, token in enumerate(tokens)})
        return self._vocab

    def generate(
        self,
        items: Sequence[EngineItem],
        sampling: Sampling,
        listener: GenerationListener,
        alone: bool = False,
    ) -> None:
        groups = _eos_groups(items)
        if groups is not None:
            for indices in groups:
                self.generate([items[i] for i in indices], sampling, _Renumbered(listener, indices), alone)
            return
        tracker = _SequenceTracker(items, listener, self.tokenizer.decode, self.end_token)
        longest = max(item.max_new_tokens for item in items)
        ignore_eos = items[0].ignore_eos
        kwargs: dict[str, Any] = {}
        if not sampling.greedy:
            kwargs.update(
                sampling_topk=sampling.top_k,
                sampling_topp=sampling.top_p,
                sampling_temperature=sampling.temperature,
            )

        def on_step(step: Any) -> bool:
            return tracker.step_callback(step.batch_id, step.token)

        # The per-step callback is what answers short requests early, streams text and stops
        # abandoned sequences; each call takes the GIL from the engine thread, which waits behind
        # a busy event loop. A batch of equal lengths with no per-token item runs without it.
        per_step = any(item.per_token or item.max_new_tokens != longest for item in items)
        generator = self._lone if alone and self._lone is not None else self._generator
        # ignore_eos: min_length = max_length, exactly the requested count (EOS cannot end it);
        # otherwise CTranslate2 ends each sequence at the end token, returned so it is counted.
        # Shorter sequences are stopped through the callback when their own count is reached.
        results = generator.generate_batch(
            [item.engine_input for item in items],
            max_length=longest,
            min_length=longest if ignore_eos else 0,
            return_end_token=not ignore_eos,
            include_prompt_in_result=False,
            beam_size=1,
            callback=on_step if per_step else None,
            **kwargs,
        )
        for index, result in enumerate(results):
            if per_step:
                tracker.ended_by_engine(index)
            else:
                tracker.complete(index, result.sequences[0])
        tracker.finish_all()

    def close(self) -> None:
        self._generator.unload_model()
        if self._lone is not None:
            self._lone.unload_model()


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
        fail_every: int = 0,
        eos_after: int = 0,
    ) -> None:
        self.latency = latency or LatencyModel()
        self.concurrency = concurrency
        self.fail_every = fail_every  # fault injection for reliability tests: every Nth batch raises
        # A sequence that does not ignore EOS emits the end token as its eos_after-th generated
        # token (0: never, like random weights), so EOS handling is testable without weights.
        self.eos_after = eos_after
        self.end_token = EOS
        self._calls = itertools.count(1)
        self.tokenizer = shared_tokenizer()
        self.info = ModelInfo(
            name=name, kind="simulated", device="simulated", compute_type="none", slots=concurrency
        )
        self._slots = threading.Semaphore(concurrency)  # like CUDA streams: extra calls wait

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
        self,
        items: Sequence[EngineItem],
        sampling: Sampling,
        listener: GenerationListener,
        alone: bool = False,
    ) -> None:
        tracker = _SequenceTracker(items, listener, self.tokenizer.decode)
        call = next(self._calls)
        _precise_sleeps()
        words = [self.words_of(item.prompt_tokens) for item in items]
        longest = max(item.max_new_tokens for item in items)
        # Like CTranslate2Engine: per-step work only when an item needs it.
        per_step = any(item.per_token or item.max_new_tokens != longest for item in items)
        with self._slots:
            deadline = time.monotonic() + self.latency.prefill_s
            if self.fail_every and call % self.fail_every == 0:
                _sleep_until(deadline)
                raise RuntimeError(f"injected fault in simulated batch {call}")
            if not per_step:  # one sleep for the whole call: one wake-up's overshoot, not two
                _sleep_until(deadline + longest * (self.latency.step_s + self.latency.step_per_seq_s * len(items)))
                for i, item in enumerate(items):
                    first, cycle = len(item.generated), words[i]
                    tokens = [cycle[(first + k) % len(cycle)] for k in range(longest)]
                    if self.eos_after and not item.ignore_eos and first < self.eos_after <= first + longest:
                        tokens[self.eos_after - 1 - first] = self.end_token
                    tracker.complete(i, tokens)
            else:
                _sleep_until(deadline)
                self._run_steps(items, words, tracker, listener, deadline)
        tracker.finish_all()

    def _run_steps(
        self,
        items: Sequence[EngineItem],
        words: list[list[str]],
        tracker: _SequenceTracker,
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
    remaining = deadline - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)  # releases the GIL
