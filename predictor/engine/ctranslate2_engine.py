"""CTranslate2: OPT (or any CTranslate2 decoder-only model) through `Generator.generate_batch`."""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from predictor.build_model import read_manifest
from predictor.engine.api import SHARED, EngineItem, GenerationListener, ModelInfo, Placement, Sampling, TokenLogprob
from predictor.engine.threads import (
    BACKGROUND_NICE,
    ThreadPlan,
    at_low_priority,
    cpu_cores,
    resolve_compute_type,
    resolve_device,
)
from predictor.engine.tracker import Renumbered, SequenceTracker
from predictor.tokenizer import EOS, shared_tokenizer

log = logging.getLogger("ferry.engine")


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
        background: bool | None = None,
    ) -> None:
        import ctranslate2

        manifest = read_manifest(model_dir)
        device = resolve_device(device)
        compute_type = resolve_compute_type(compute_type, device)
        self.plan = ThreadPlan.choose(device, inter_threads, intra_threads, cpu_cores(), background)

        def generator(inter: int, intra: int) -> Any:
            return ctranslate2.Generator(
                str(model_dir),
                device=device,
                device_index=device_index,
                compute_type=compute_type,
                inter_threads=inter,
                intra_threads=intra,
            )

        def generators() -> _Generators:
            # The lone generator: about 130 MB more for OPT-125m int8 (inter_threads replicas
            # share the weights; a second Generator does not); measured not to slow the other.
            lone = generator(1, self.plan.lone_threads) if self.plan.lone_threads else None
            return _Generators(generator(self.plan.slots, self.plan.threads_per_slot), lone)

        self._interactive = generators()
        # Built on the first long request, not at start-up: measured at 40 users of short
        # requests, a server holding the idle background generators answered about 4 % fewer.
        self._build_background = functools.partial(at_low_priority, generators)
        self._background: _Generators | None = None
        self._background_lock = threading.Lock()
        self.concurrency = self.plan.slots
        self.background_concurrency = self.plan.slots if self.plan.background else 0
        self.tokenizer = shared_tokenizer()
        self.info = ModelInfo(
            name=name,
            kind=str(manifest.get("kind", "converted")),
            device=device,
            compute_type=self._interactive.shared.compute_type,
            source=str(manifest.get("source", "")),
            slots=self.plan.slots,
            threads_per_slot=self.plan.threads_per_slot,
            lone_batch_threads=self.plan.lone_threads,
            background_slots=self.background_concurrency,
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
            log_probs = np.asarray(self._interactive.shared.forward_batch(batch, return_log_probs=True))
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
        self, items: Sequence[EngineItem], sampling: Sampling, listener: GenerationListener, where: Placement = SHARED
    ) -> None:
        groups = _eos_groups(items)
        if groups is not None:
            for indices in groups:
                part = [items[i] for i in indices]
                self.generate(part, sampling, Renumbered(listener, indices), where)
            return
        tracker = SequenceTracker(items, listener, self.tokenizer.decode, self.end_token)
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
        # A background call never takes it: a low-priority thread holding the GIL while the
        # interactive threads keep the cores would stall the event loop (priority inversion).
        per_step = not where.background and any(item.per_token or item.max_new_tokens != longest for item in items)
        lane = self._background_generators() if where.background else self._interactive
        generator = lane.lone if where.alone and lane.lone is not None else lane.shared
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

    def _background_generators(self) -> _Generators:
        if not self.plan.background:
            return self._interactive
        with self._background_lock:  # both background slots may ask at once
            if self._background is None:
                self._background = self._build_background()
                log.info("background generators built (nice %d)", BACKGROUND_NICE)
            return self._background

    def close(self) -> None:
        for lane in (self._interactive, self._background):
            if lane is not None:
                lane.close()


@dataclass(frozen=True)
class _Generators:
    """One lane's generators: `shared` runs the slots' calls, `lone` a call that runs alone."""

    shared: Any
    lone: Any | None

    def close(self) -> None:
        self.shared.unload_model()
        if self.lone is not None:
            self.lone.unload_model()
