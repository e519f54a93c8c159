"""Protocol parsing tables: each wire format's good inputs and the exact field each mistake names."""

from __future__ import annotations

from typing import Any

import pytest
from kserve import InferInput, InferRequest

from predictor.protocols import generate, v1, v2
from predictor.protocols.errors import InvalidRequest
from tests.fakes import GatedEngine
from tests.helpers import limits

LIMITS = limits(max_prompt_tokens=8)
ENGINE = GatedEngine()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"instances": ["a b"]}, [(["</s>", "a", "b"], 16)]),
        ({"instances": ["a", {"text": "b", "max_new_tokens": 3}]}, [(["</s>", "a"], 16), (["</s>", "b"], 3)]),
        ({"instances": ["a"], "parameters": {"max_new_tokens": 5}}, [(["</s>", "a"], 5)]),
        ({"instances": [{"text": "a"}], "parameters": {"max_new_tokens": 5}}, [(["</s>", "a"], 5)]),
    ],
)
def test_v1_good(payload: dict[str, Any], expected: list[tuple[list[str], int]]) -> None:
    requests = v1.parse(payload, ENGINE, LIMITS)
    assert [(r.prompt_tokens, r.max_new_tokens) for r in requests] == expected


@pytest.mark.parametrize(
    ("payload", "field", "limit"),
    [
        ([], "body", "JSON object"),
        ({"inputs": []}, "instances", "list"),
        ({"instances": []}, "instances", "at least one"),
        ({"instances": ["a"] * 5}, "instances", "limit is 4"),
        ({"instances": [""]}, "instances[0]", "empty"),
        ({"instances": [3]}, "instances[0]", "string"),
        ({"instances": [{"max_new_tokens": 3}]}, "instances[0].text", "required"),
        ({"instances": [{"text": "a", "temp": 1}]}, "instances[0]", "unknown"),
        ({"instances": [{"text": "a", "max_new_tokens": 0}]}, "instances[0].max_new_tokens", "between 1 and 64"),
        ({"instances": [{"text": "a", "max_new_tokens": 65}]}, "instances[0].max_new_tokens", "between 1 and 64"),
        ({"instances": [{"text": "a", "max_new_tokens": "5"}]}, "instances[0].max_new_tokens", "integer"),
        ({"instances": [{"text": "a", "max_new_tokens": 2.5}]}, "instances[0].max_new_tokens", "integer"),
        ({"instances": [{"text": "a", "max_new_tokens": True}]}, "instances[0].max_new_tokens", "integer"),
        ({"instances": ["a b c d e f g h i"]}, "instances[0]", "limit is 8"),
        ({"instances": ["a"], "parameters": {"timeout_s": 0}}, "parameters.timeout_s", "<= 60"),
        ({"instances": ["a"], "parameters": {"timeout_s": 61}}, "parameters.timeout_s", "<= 60"),
        ({"instances": ["a"], "parameters": []}, "parameters", "object"),
    ],
)
def test_v1_bad(payload: Any, field: str, limit: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        v1.parse(payload, ENGINE, LIMITS)
    assert caught.value.field == field
    assert limit in str(caught.value)


def v2_request(*inputs: InferInput, parameters: dict[str, Any] | None = None) -> InferRequest:
    return InferRequest(model_name="m", infer_inputs=list(inputs), parameters=parameters)


def text(values: list[Any], shape: list[int] | None = None, datatype: str = "BYTES") -> InferInput:
    return InferInput("text", shape or [len(values)], datatype, values)


def test_v2_good() -> None:
    tokens = InferInput("max_new_tokens", [2], "INT32", [3, 4])
    requests = v2.parse(v2_request(text(["a", b"b"]), tokens), ENGINE, LIMITS)
    assert [(r.prompt_tokens, r.max_new_tokens) for r in requests] == [(["</s>", "a"], 3), (["</s>", "b"], 4)]
    one = InferInput("max_new_tokens", [1], "INT64", [7])
    assert [r.max_new_tokens for r in v2.parse(v2_request(text(["a", "b"]), one), ENGINE, LIMITS)] == [7, 7]
    param = v2.parse(v2_request(text(["a"]), parameters={"max_new_tokens": 9}), ENGINE, LIMITS)
    assert param[0].max_new_tokens == 9


@pytest.mark.parametrize(
    ("request_", "field", "limit"),
    [
        (v2_request(), "inputs", "required"),
        (v2_request(InferInput("prompt", [1], "BYTES", ["a"])), "inputs", "unknown"),
        (v2_request(text([1.0], datatype="FP32")), "inputs.text.datatype", "BYTES"),
        (v2_request(text(["a", "b"], shape=[3])), "inputs.text.shape", "2 values"),
        (v2_request(text([b"\xff\xfe"])), "inputs.text[0]", "UTF-8"),
        (v2_request(text([""])), "inputs.text[0]", "empty"),
        (v2_request(text(["a"] * 5)), "inputs.text", "limit is 4"),
        (
            v2_request(text(["a"]), InferInput("max_new_tokens", [1], "FP32", [1.0])),
            "inputs.max_new_tokens.datatype",
            "INT32",
        ),
        (
            v2_request(text(["a", "b", "c"]), InferInput("max_new_tokens", [2], "INT32", [1, 2])),
            "inputs.max_new_tokens.shape",
            "[1] or [N]",
        ),
        (
            v2_request(text(["a"]), InferInput("max_new_tokens", [1], "INT32", [100])),
            "inputs.max_new_tokens[0]",
            "between 1 and 64",
        ),
        (v2_request(text(["a"]), parameters={"max_new_tokens": -1}), "parameters.max_new_tokens", "between 1 and 64"),
    ],
)
def test_v2_bad(request_: InferRequest, field: str, limit: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        v2.parse(request_, ENGINE, LIMITS)
    assert caught.value.field == field
    assert limit in str(caught.value)


def test_generate_good() -> None:
    request = generate.parse({"text": "a b", "max_new_tokens": 10}, ENGINE, LIMITS)
    assert (request.prompt_tokens, request.max_new_tokens) == (["</s>", "a", "b"], 10)
    assert generate.parse({"text": "a"}, ENGINE, LIMITS).max_new_tokens == 16


@pytest.mark.parametrize(
    ("payload", "field", "limit"),
    [
        ("text", "body", "JSON object"),
        ({}, "text", "required"),
        ({"text": None}, "text", "string"),
        ({"text": "a", "max_tokens": 3}, "body", "unknown"),
        ({"text": "a", "max_new_tokens": 1000}, "max_new_tokens", "between 1 and 64"),
        ({"text": "a", "timeout_s": "soon"}, "timeout_s", "seconds"),
    ],
)
def test_generate_bad(payload: Any, field: str, limit: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        generate.parse(payload, ENGINE, LIMITS)
    assert caught.value.field == field
    assert limit in str(caught.value)
