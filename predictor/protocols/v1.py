"""KServe V1: {"instances": [...]} -> {"predictions": [...]}.

An instance is a prompt string or {"text": ..., "max_new_tokens": ..., "ignore_eos": ...};
request-wide `parameters` may set max_new_tokens, ignore_eos and timeout_s for instances that
don't. Generation ends at the model's end token unless ignore_eos is true.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from predictor.batcher import GenerationRequest
from predictor.engine import Engine, EngineOutput
from predictor.protocols.errors import InvalidRequest
from predictor.protocols.requests import (
    Limits,
    build_request,
    check_count,
    check_flag,
    check_max_new_tokens,
    check_text,
    check_timeout,
)


def parse(payload: Any, engine: Engine, limits: Limits) -> list[GenerationRequest]:
    if not isinstance(payload, dict):
        raise InvalidRequest("body", "must be a JSON object with an `instances` list")
    instances = payload.get("instances")
    if not isinstance(instances, list):
        raise InvalidRequest("instances", "must be a list of prompts")
    check_count(len(instances), "instances", limits)
    parameters = payload.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("parameters", "must be an object")
    default_tokens = check_max_new_tokens(
        parameters.get("max_new_tokens"), "parameters.max_new_tokens", limits
    )
    timeout_s = check_timeout(parameters.get("timeout_s"), "parameters.timeout_s", limits)
    default_ignore_eos = check_flag(parameters.get("ignore_eos"), "parameters.ignore_eos")
    requests = []
    for i, instance in enumerate(instances):
        where = f"instances[{i}]"
        if isinstance(instance, dict):
            unknown = set(instance) - {"text", "max_new_tokens", "ignore_eos"}
            if unknown:
                raise InvalidRequest(
                    where, f"unknown field(s) {sorted(unknown)}; allowed: text, max_new_tokens, ignore_eos"
                )
            if "text" not in instance:
                raise InvalidRequest(f"{where}.text", "is required")
            text = check_text(instance["text"], f"{where}.text")
            tokens = (
                check_max_new_tokens(instance["max_new_tokens"], f"{where}.max_new_tokens", limits)
                if instance.get("max_new_tokens") is not None
                else default_tokens
            )
            ignore_eos = check_flag(instance.get("ignore_eos"), f"{where}.ignore_eos", default_ignore_eos)
        else:
            text = check_text(instance, where)
            tokens = default_tokens
            ignore_eos = default_ignore_eos
        requests.append(
            build_request(engine, text, tokens, limits, field=where, timeout_s=timeout_s, ignore_eos=ignore_eos)
        )
    return requests


def response(outputs: Sequence[EngineOutput]) -> dict[str, Any]:
    return {
        "predictions": [
            {"generated_text": o.text, "generated_tokens": o.generated_tokens} for o in outputs
        ]
    }
