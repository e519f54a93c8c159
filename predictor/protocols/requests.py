"""Validation shared by every protocol: each client mistake becomes an InvalidRequest naming
the field and the limit; each valid prompt becomes one GenerationRequest."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from predictor.batcher import GenerationRequest
from predictor.engine import GREEDY, Engine, Sampling
from predictor.protocols.errors import InvalidRequest
from predictor.settings import Settings

T = TypeVar("T")

# The most characters one token of GPT-2's byte-level BPE vocabulary (OPT's) covers: 66
# ("Ġ" and 65 "="; the longest in bytes, 128, is 64 two-byte characters). A prompt longer than
# max_prompt_tokens x 66 characters cannot fit in max_prompt_tokens, so it is refused before
# any tokenising (tests/test_security.py checks the constant against the vocabulary).
MAX_CHARS_PER_TOKEN = 66
# Prompts (in total, per request) longer than this are tokenised off the event loop: about
# 0.7 us a character, so a request that stays on the loop holds it for a few ms at most.
INLINE_TOKENIZE_CHARS = 8192


@dataclass(frozen=True)
class Limits:
    default_max_new_tokens: int
    max_new_tokens: int
    max_prompt_tokens: int
    max_instances: int
    request_timeout_s: float
    max_request_timeout_s: float
    max_positions: int = 2048

    @property
    def max_prompt_chars(self) -> int:
        return self.max_prompt_tokens * MAX_CHARS_PER_TOKEN

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            default_max_new_tokens=settings.default_max_new_tokens,
            max_new_tokens=settings.max_new_tokens_limit,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_instances=settings.max_instances,
            request_timeout_s=settings.request_timeout_s,
            max_request_timeout_s=settings.max_request_timeout_s,
        )


def check_text(value: Any, field: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(field, f"is not valid UTF-8 (byte {exc.start})") from None
    if not isinstance(value, str):
        raise InvalidRequest(field, f"must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidRequest(field, "must not be empty")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's "\ud800" parses to a lone surrogate
            raise InvalidRequest(field, f"is not valid Unicode (a lone surrogate at character {exc.start})") from None
    return value


def check_max_new_tokens(value: Any, field: str, limits: Limits) -> int:
    if value is None:
        return limits.default_max_new_tokens
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(field, f"must be an integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidRequest(field, f"must be an integer, got {value}")
        value = int(value)
    if value < 1 or value > limits.max_new_tokens:
        raise InvalidRequest(field, f"must be between 1 and {limits.max_new_tokens}, got {value}")
    return int(value)


def check_timeout(value: Any, field: str, limits: Limits) -> float:
    if value is None:
        return limits.request_timeout_s
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(field, "must be a number of seconds")
    if value <= 0 or value > limits.max_request_timeout_s:
        raise InvalidRequest(
            field, f"must be > 0 and <= {limits.max_request_timeout_s:g} seconds, got {value}"
        )
    return float(value)


def check_flag(value: Any, field: str, default: bool = False) -> bool:
    """A JSON boolean (None: the default); no truthy strings or numbers."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(field, f"must be true or false, got {type(value).__name__}")
    return value


def check_count(count: int, field: str, limits: Limits) -> None:
    if count < 1:
        raise InvalidRequest(field, "must hold at least one prompt")
    if count > limits.max_instances:
        raise InvalidRequest(field, f"holds {count} prompts; the limit is {limits.max_instances}")


def build_request(
    engine: Engine,
    text: str,
    max_new_tokens: int,
    limits: Limits,
    *,
    field: str,
    timeout_s: float | None = None,
    sampling: Sampling = GREEDY,
    incremental: bool = False,
    stop: tuple[str, ...] = (),
    ignore_eos: bool = False,
) -> GenerationRequest:
    if len(text) > limits.max_prompt_chars:  # before tokenising: it cannot fit
        raise InvalidRequest(
            field,
            f"prompt is {len(text)} characters; the limit is {limits.max_prompt_chars} "
            f"({limits.max_prompt_tokens} tokens of at most {MAX_CHARS_PER_TOKEN} characters)",
        )
    tokens = engine.tokenize(text)
    if len(tokens) > limits.max_prompt_tokens:
        raise InvalidRequest(
            field, f"prompt is {len(tokens)} tokens; the limit is {limits.max_prompt_tokens}"
        )
    if len(tokens) + max_new_tokens > limits.max_positions:
        raise InvalidRequest(
            field,
            f"prompt ({len(tokens)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's {limits.max_positions} positions",
        )
    return GenerationRequest(
        prompt_tokens=tokens,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        timeout_s=timeout_s if timeout_s is not None else limits.request_timeout_s,
        incremental=incremental,
        stop=stop,
        ignore_eos=ignore_eos,
    )


async def off_loop(chars: int, parse: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`parse(*args, **kwargs)` (validation and tokenising) here when the request's prompts
    are short (`chars`, or its body size, at most INLINE_TOKENIZE_CHARS), else in a worker
    thread, so that a long prompt never holds the event loop (the tokenizer releases the GIL
    for long texts)."""
    if chars <= INLINE_TOKENIZE_CHARS:
        return parse(*args, **kwargs)
    return await asyncio.to_thread(parse, *args, **kwargs)


def payload_chars(value: Any, budget: int = 20_000) -> int:
    """About how many characters of text a decoded payload holds (strings and bytes, walked
    over at most `budget` nodes; a payload past the budget counts as large)."""
    total = 0
    stack = [value]
    while stack:
        budget -= 1
        if budget < 0:
            return INLINE_TOKENIZE_CHARS + 1
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(itertools.islice(item.values(), budget))
        elif isinstance(item, list | tuple):
            stack.extend(item[:budget])
        elif hasattr(item, "inputs") and isinstance(item.inputs, list):  # kserve.InferRequest
            stack.extend(getattr(tensor, "data", None) for tensor in item.inputs)
    return total
