"""Open Inference Protocol (KServe V2), REST and gRPC alike (KServe hands both as InferRequest).

Inputs: `text` BYTES [N]; optional `max_new_tokens` INT32/INT64 [N] or [1]. Request parameters
`max_new_tokens`, `ignore_eos` (bool: exactly max_new_tokens; otherwise the model's end token
ends a sequence) and `timeout_s` apply to every prompt. Outputs: `generated_text` BYTES [N] and
`generated_tokens` INT32 [N].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kserve import InferInput, InferOutput, InferRequest, InferResponse

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

INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}

INPUTS_METADATA = [
    {"name": "text", "datatype": "BYTES", "shape": [-1]},
    {"name": "max_new_tokens", "datatype": "INT32", "shape": [-1]},
]
OUTPUTS_METADATA = [
    {"name": "generated_text", "datatype": "BYTES", "shape": [-1]},
    {"name": "generated_tokens", "datatype": "INT32", "shape": [-1]},
]


def _values(tensor: InferInput) -> list[Any]:
    data = tensor.data
    if isinstance(data, list):
        flat: list[Any] = []
        for item in data:
            flat.extend(item if isinstance(item, list) else [item])
        return flat
    try:  # raw (binary) contents: their size must agree with the shape and datatype
        return list(tensor.as_numpy().reshape(-1).tolist())
    except Exception:
        raise InvalidRequest(
            f"inputs.{tensor.name}", f"data does not match shape {list(tensor.shape)} and datatype {tensor.datatype}"
        ) from None


def _parameter(parameters: Any, name: str) -> Any:
    if not parameters or name not in parameters:
        return None
    value = parameters[name]
    if hasattr(value, "ListFields"):  # gRPC InferParameter: whichever of its oneof is set
        fields = value.ListFields()
        return fields[0][1] if fields else None
    return value


def parse(request: InferRequest, engine: Engine, limits: Limits) -> list[GenerationRequest]:
    by_name = {tensor.name: tensor for tensor in request.inputs}
    unknown = set(by_name) - {"text", "max_new_tokens"}
    if unknown:
        raise InvalidRequest("inputs", f"unknown input(s) {sorted(unknown)}; expected text, max_new_tokens")
    text_tensor = by_name.get("text")
    if text_tensor is None:
        raise InvalidRequest("inputs", "input `text` (BYTES, shape [N]) is required")
    if text_tensor.datatype != "BYTES":
        raise InvalidRequest("inputs.text.datatype", f"must be BYTES, got {text_tensor.datatype}")
    texts = _values(text_tensor)
    check_count(len(texts), "inputs.text", limits)
    if list(text_tensor.shape) not in ([len(texts)], [len(texts), 1], [1, len(texts)]):
        raise InvalidRequest("inputs.text.shape", f"{list(text_tensor.shape)} does not match its {len(texts)} values")

    default_tokens = check_max_new_tokens(
        _parameter(request.parameters, "max_new_tokens"), "parameters.max_new_tokens", limits
    )
    timeout_s = check_timeout(_parameter(request.parameters, "timeout_s"), "parameters.timeout_s", limits)
    ignore_eos = check_flag(_parameter(request.parameters, "ignore_eos"), "parameters.ignore_eos")
    token_counts = [default_tokens] * len(texts)
    tokens_tensor = by_name.get("max_new_tokens")
    if tokens_tensor is not None:
        if tokens_tensor.datatype not in INTEGER_TYPES:
            raise InvalidRequest(
                "inputs.max_new_tokens.datatype", f"must be an integer type (INT32), got {tokens_tensor.datatype}"
            )
        values = _values(tokens_tensor)
        if len(values) == 1:
            values = values * len(texts)
        if len(values) != len(texts):
            raise InvalidRequest(
                "inputs.max_new_tokens.shape", f"has {len(values)} values for {len(texts)} prompts (use [1] or [N])"
            )
        token_counts = [
            check_max_new_tokens(v, f"inputs.max_new_tokens[{i}]", limits) for i, v in enumerate(values)
        ]

    requests = []
    for i, (raw, count) in enumerate(zip(texts, token_counts, strict=True)):
        text = check_text(raw, f"inputs.text[{i}]")
        requests.append(
            build_request(
                engine, text, count, limits, field=f"inputs.text[{i}]", timeout_s=timeout_s, ignore_eos=ignore_eos
            )
        )
    return requests


def response(request: InferRequest, model_name: str, outputs: Sequence[EngineOutput]) -> InferResponse:
    n = len(outputs)
    texts: list[Any] = [o.text for o in outputs]
    if request.from_grpc:
        texts = [t.encode("utf-8") for t in texts]
    return InferResponse(
        response_id=request.id or "",
        model_name=model_name,
        infer_outputs=[
            InferOutput(name="generated_text", shape=[n], datatype="BYTES", data=texts),
            InferOutput(
                name="generated_tokens", shape=[n], datatype="INT32", data=[o.generated_tokens for o in outputs]
            ),
        ],
        from_grpc=request.from_grpc,
    )
