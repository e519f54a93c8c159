"""Incremental detokenisation and stop strings, for one sequence, shared by every protocol.

Runs in the engine thread (see `engine.tracker.SequenceTracker`), so a stop string ends its sequence
at the step that completes it, and the event loop receives text deltas, never token strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to, for now


class TextAssembler:
    """Token strings in, text deltas out.

    The deltas' concatenation equals `decode(all tokens)` (the plain response's text), cut
    before the first stop string. Two things are held back until they are settled: a trailing
    U+FFFD (an incomplete UTF-8 sequence that the next byte token may complete) and a trailing
    piece of text that could be the start of a stop string.
    """

    def __init__(self, decode: Callable[[Sequence[str]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = tuple(stops)
        self.tokens: list[str] = []
        self._base = 0  # tokens before this index decode to `_settled` and end on a character
        self._settled = ""
        self.text = ""  # what was handed out so far
        self.stopped = False  # a stop string was found

    def push(self, token: str) -> str:
        """The new text this token makes certain (often "", e.g. half a UTF-8 character)."""
        self.tokens.append(token)
        tail = self._decode(self.tokens[self._base :])
        if tail.endswith(REPLACEMENT):
            return self._emit(self._settled + tail.rstrip(REPLACEMENT), final=False)
        self._settled += tail
        self._base = len(self.tokens)
        return self._emit(self._settled, final=False)

    def finish(self) -> str:
        """The end of the sequence: whatever was held back."""
        if self.stopped:
            return ""
        return self._emit(self._settled + self._decode(self.tokens[self._base :]), final=True)

    def _emit(self, visible: str, *, final: bool) -> str:
        if self.stopped:
            return ""
        start = len(self.text)
        end = len(visible)
        hits = [i for i in (visible.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        elif not final:
            end -= self._partial_stop(visible, start)
        delta = visible[start:end]
        self.text += delta
        return delta

    def _partial_stop(self, visible: str, start: int) -> int:
        """Length of the longest suffix of visible[start:] that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(visible) - start), longest, -1):
                if visible.endswith(stop[:k]):
                    longest = k
                    break
        return longest
