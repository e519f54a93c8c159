"""OpenAI completions on ferry's batcher: one `RequestStream` per prompt, plain or streamed.

Every prompt is one `GenerationRequest` through the same batcher as V1/V2/gRPC and /generate;
streamed requests share batches with plain ones (the batcher groups by `Sampling` only).
Stop strings and incremental detokenisation happen in the core (`predictor.text`), so the
plain and streamed paths cut the text at the same place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

from predictor.batcher import Batcher, BatcherError, Event, GenerationRequest, RequestStream, TextDelta
from predictor.engine import EngineOutput
from predictor.protocols.openai.responses import DONE, ChoiceResult, Envelope, error_status_and_body, sse

log = logging.getLogger("ferry.openai")


def choice(index: int, request: GenerationRequest, output: EngineOutput) -> ChoiceResult:
    # OpenAI's "stop": a stop string or the model's end token (ferry's "eos").
    reason = "stop" if output.finish_reason in ("stop", "eos") else "length"
    return ChoiceResult(index, len(request.prompt_tokens), output.text, output.generated_tokens, reason)


class Completion:
    """The prompts of one request, admitted together; if one is refused, the admitted ones are
    abandoned and the BatcherError is raised."""

    def __init__(self, batcher: Batcher, requests: Sequence[GenerationRequest]) -> None:
        self.requests = list(requests)
        self.streams: list[RequestStream] = []
        try:
            for request in self.requests:
                self.streams.append(batcher.submit(request))
        except BatcherError:
            self.close()
            raise
        self.choices = [ChoiceResult(i, len(r.prompt_tokens)) for i, r in enumerate(self.requests)]

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(prompt index, event) in the order they happen; raises the first failure."""
        if len(self.streams) == 1:
            async for event in self.streams[0]:
                yield 0, event
            return
        merged: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for event in stream:
                    merged.put_nowait((index, event))
                merged.put_nowait((index, None))
            except Exception as exc:
                merged.put_nowait((index, exc))

        pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(pumps)
            while remaining:
                index, item = await merged.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in pumps:
                task.cancel()

    def close(self) -> None:
        """Stops every unfinished sequence (client gone, a failure, or the end)."""
        for stream in self.streams:
            stream.close()


class CompletionStream:
    """Server-sent events for one completion; `error` is the failure it reported, if any."""

    def __init__(self, completion: Completion, envelope: Envelope, include_usage: bool) -> None:
        self.completion = completion
        self.envelope = envelope
        self.include_usage = include_usage
        self.error: BaseException | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            opening = self.envelope.opening(with_usage=self.include_usage)
            if opening:
                yield opening
            async for index, event in self.completion.events():
                if isinstance(event, TextDelta):
                    yield self.envelope.chunk(index, event.text, None, with_usage=self.include_usage)
                else:
                    done = choice(index, self.completion.requests[index], event)
                    self.completion.choices[index] = done
                    yield self.envelope.chunk(index, "", done.finish_reason, with_usage=self.include_usage)
            if self.include_usage:
                yield self.envelope.usage_chunk(self.completion.choices)
        except Exception as exc:
            # Headers are sent: report the failure as an event (the openai client raises it).
            # (an unexpected failure is logged once, under the error id the event carries)
            self.error = exc
            yield sse(error_status_and_body(exc)[1])
        finally:
            self.completion.close()
        yield DONE
