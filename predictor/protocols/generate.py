"""The write-up's own route: POST /generate {"text": ..., "max_new_tokens": 10}, so its locust
file runs against ferry unchanged. Answers {"generated_text": ..., "generated_tokens": n}.
Generation ends at the model's end token unless `"ignore_eos": true` (exactly max_new_tokens)."""

from __future__ import annotations

from typing import Any

from predictor.batcher import GenerationRequest
from predictor.engine import Engine, EngineOutput
from predictor.protocols.errors import InvalidRequest
from predictor.protocols.requests import (
    Limits,
    build_request,
    check_flag,
    check_max_new_tokens,
    check_text,
    check_timeout,
)

FIELDS = {"text", "max_new_tokens", "timeout_s", "ignore_eos"}


def parse(payload: Any, engine: Engine, limits: Limits) -> GenerationRequest:
    if not isinstance(payload, dict):
        raise InvalidRequest("body", "must be a JSON object like {\"text\": \"...\", \"max_new_tokens\": 10}")
    unknown = set(payload) - FIELDS
    if unknown:
        raise InvalidRequest("body", f"unknown field(s) {sorted(unknown)}; allowed: {sorted(FIELDS)}")
    if "text" not in payload:
        raise InvalidRequest("text", "is required")
    text = check_text(payload["text"], "text")
    tokens = check_max_new_tokens(payload.get("max_new_tokens"), "max_new_tokens", limits)
    timeout_s = check_timeout(payload.get("timeout_s"), "timeout_s", limits)
    ignore_eos = check_flag(payload.get("ignore_eos"), "ignore_eos")
    return build_request(engine, text, tokens, limits, field="text", timeout_s=timeout_s, ignore_eos=ignore_eos)


def response(output: EngineOutput) -> dict[str, Any]:
    return {"generated_text": output.text, "generated_tokens": output.generated_tokens}
