"""OpenAI log-probabilities: completions `logprobs` (0-5) and `echo` scoring, chat
`logprobs`/`top_logprobs`.

Generation runs through the batcher like any request (so it still batches with others); the
log-probabilities of the finished sequence (prompt + generated tokens) then come from
forward passes over the request's prompts (`engine.logprobs`, CTranslate2's forward_batch,
grouped within a token budget), run on the engine's threads. With `echo` and `max_tokens: 0`
nothing is generated: the prompt is scored, its first token's log-probability `null`, as
evaluation harnesses expect (see `completion_logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from predictor.engine import TokenLogprob
from predictor.protocols.openai.schema import OpenAIError

if TYPE_CHECKING:
    from predictor.model import FerryModel

Decode = Callable[[Sequence[str]], str]


async def score(model: FerryModel, sequences: list[list[str]], top: int) -> list[list[TokenLogprob]]:
    """Each sequence's tokens after the first, with their log-probabilities (engine threads)."""
    scorer = getattr(model.inference_engine, "logprobs", None)
    if scorer is None:
        raise OpenAIError("logprobs: this engine cannot compute log-probabilities", param="logprobs")
    return await model.batcher.call_engine(scorer, sequences, top)


def completion_logprobs(
    prompt_tokens: Sequence[str],
    generated: Sequence[str],
    scored: Sequence[TokenLogprob],
    *,
    echo: bool,
    decode: Decode,
) -> dict[str, Any]:
    """The legacy completions object: tokens, token_logprobs, top_logprobs, text_offset (offsets
    into the choice's text, which starts with the prompt when echoed).

    Echoed, the prompt is the client's text: OPT's leading `</s>` (which ferry adds, as OPT's
    tokenizer does) is not among the tokens, so they join to the prompt and line up with a
    client's own tokenisation of it; the first has no log-probability (`null`) as in OpenAI's
    API, every later one is conditioned on `</s>` and the tokens before it."""
    entries: list[tuple[str, float | None, tuple[tuple[str, float], ...] | None]] = []
    if echo:
        entries.append((prompt_tokens[1], None, None))
        entries.extend((s.token, s.logprob, s.top) for s in scored[1 : len(prompt_tokens) - 1])
    entries.extend((s.token, s.logprob, s.top) for s in scored[len(prompt_tokens) - 1 :][: len(generated)])
    tokens = [decode([token]) for token, _, _ in entries]
    offsets = []
    offset = 0
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [logprob for _, logprob, _ in entries],
        "top_logprobs": [
            None if top is None else {decode([token]): logprob for token, logprob in top} for _, _, top in entries
        ],
        "text_offset": offsets,
    }


def chat_logprobs(
    prompt_length: int, generated: Sequence[str], scored: Sequence[TokenLogprob], *, decode: Decode
) -> dict[str, Any]:
    """The chat object: one entry per generated token, with its bytes and the top ones."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        text = decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for s in scored[prompt_length - 1 :][: len(generated)]:
        content.append({**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]})
    return {"content": content, "refusal": None}


async def gather_scores(
    model: FerryModel, prompts: Sequence[Sequence[str]], outputs: Sequence[Sequence[str]], top: int
) -> list[list[TokenLogprob]]:
    sequences = [list(p) + list(o) for p, o in zip(prompts, outputs, strict=True)]
    return await score(model, sequences, top)

