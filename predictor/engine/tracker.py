"""Per-call bookkeeping shared by the engines (runs in the engine thread)."""

from __future__ import annotations

from collections.abc import Sequence

from predictor.engine.api import Decode, EngineItem, EngineOutput, FinishReason, GenerationListener
from predictor.tokenizer import EOS


class SequenceTracker:
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


class Renumbered:
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
