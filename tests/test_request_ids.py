"""Request IDs: X-Request-Id read or generated and returned on every HTTP route (answers, errors,
event streams), the OpenAI id's suffix, gRPC's x-request-id metadata and ModelInferRequest.id
echoed, and one request's id (and traceparent) on its log lines, in text and JSON logs."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from predictor import request_context
from tests.conftest import REFERENCE_PROMPT, FerryProcess
from tests.helpers import grpc_text_request, serving

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def json_ferry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerryProcess]:
    with serving(tmp_path_factory.mktemp("ids"), log_format="json", access_log="true") as server:
        yield server


def calls(ferry: FerryProcess) -> dict[str, tuple[str, str, dict[str, object] | None]]:
    name = ferry.model_name
    text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": [REFERENCE_PROMPT]}
    return {
        "generate": ("POST", "/generate", {"text": REFERENCE_PROMPT, "max_new_tokens": 2}),
        "generate-400": ("POST", "/generate", {"text": ""}),
        "v1": ("POST", f"/v1/models/{name}:predict", {"instances": [REFERENCE_PROMPT]}),
        "v1-400": ("POST", f"/v1/models/{name}:predict", {"instances": []}),
        "v2": ("POST", f"/v2/models/{name}/infer", {"inputs": [text], "parameters": {"max_new_tokens": 2}}),
        "v2-metadata": ("GET", f"/v2/models/{name}", None),
        "openai": ("POST", "/openai/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2}),
        "openai-404": ("POST", "/openai/v1/completions", {"model": "nope", "prompt": "hi"}),
        "chat": (
            "POST",
            "/openai/v1/chat/completions",
            {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ),
        "models": ("GET", "/openai/v1/models", None),
        "unknown-route": ("GET", "/no/such/route", None),
    }


def test_every_http_route_echoes_the_clients_id(json_ferry: FerryProcess) -> None:
    with httpx.Client(base_url=json_ferry.url, timeout=30) as client:
        for kind, (method, path, body) in calls(json_ferry).items():
            request_id = f"test-{kind}-{time.monotonic_ns()}"
            answer = client.request(method, path, json=body, headers={"X-Request-Id": request_id})
            assert answer.headers.get("x-request-id") == request_id, (kind, answer.status_code, answer.headers)
            if kind == "openai":
                assert answer.json()["id"] == f"cmpl-{request_id}"
            if kind == "chat":
                assert answer.json()["id"] == f"chatcmpl-{request_id}"


def test_an_id_is_generated_when_missing_or_unusable(json_ferry: FerryProcess) -> None:
    ids = set()
    for header in ({}, {"X-Request-Id": "has spaces and {braces}"}, {"X-Request-Id": "x" * 500}):
        answer = httpx.post(
            f"{json_ferry.url}/generate", json={"text": "hi", "max_new_tokens": 1}, headers=header, timeout=30
        )
        generated = answer.headers["x-request-id"]
        assert GENERATED.fullmatch(generated), generated
        ids.add(generated)
    assert len(ids) == 3


def test_streamed_openai_answer_carries_the_id(json_ferry: FerryProcess) -> None:
    body = {"model": json_ferry.model_name, "prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", f"{json_ferry.url}/openai/v1/completions", json=body, headers={"X-Request-Id": "sse-1"}, timeout=30
    ) as answer:
        assert answer.headers["x-request-id"] == "sse-1"
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line for line in answer.iter_lines() if line.startswith("data: {")]
    assert events and all(json.loads(e[6:])["id"] == "cmpl-sse-1" for e in events)


def test_grpc_echoes_metadata_and_the_request_id(json_ferry: FerryProcess) -> None:
    request = pb.ModelInferRequest(
        model_name=json_ferry.model_name,
        id="infer-42",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"hi"])
            )
        ],
        parameters={"max_new_tokens": pb.InferParameter(int64_param=2)},
    )
    with grpc.insecure_channel(json_ferry.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id", "grpc-7"),), timeout=30)
        assert response.id == "infer-42"
        assert dict(call.initial_metadata())["x-request-id"] == "grpc-7"
        _, call = stub.ModelInfer.with_call(request, timeout=30)
        assert GENERATED.fullmatch(dict(call.initial_metadata())["x-request-id"])


def test_the_request_id_and_traceparent_are_on_its_json_log_lines(json_ferry: FerryProcess) -> None:
    request_id = f"find-me-{time.monotonic_ns()}"
    headers = {"X-Request-Id": request_id, "traceparent": TRACEPARENT}
    answer = httpx.post(
        f"{json_ferry.url}/generate", json={"text": "hi", "max_new_tokens": 1}, headers=headers, timeout=30
    )
    assert answer.status_code == 200
    deadline = time.monotonic() + 10
    mine: list[dict[str, object]] = []
    while not mine and time.monotonic() < deadline:
        for line in json_ferry.log().splitlines():
            if request_id in line and line.startswith("{"):
                mine.append(json.loads(line))
        time.sleep(0.05)  # another process's log file: nothing to await
    assert mine, json_ferry.log()[-3000:]
    assert all(record["request_id"] == request_id for record in mine)
    assert all(record["traceparent"] == TRACEPARENT for record in mine)
    assert {"time", "level", "logger", "message"} <= set(mine[0])


def test_text_log_lines_end_with_the_request_fields() -> None:
    logger = logging.getLogger("ferry.test-request-ids")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(request_context.RequestContextFilter())
    handler.setFormatter(request_context.RequestTagFormatter(logging.Formatter("%(message)s")))
    logger.addHandler(handler)
    try:
        logger.warning("outside any request")
        bound = request_context.bind("abc-1", TRACEPARENT)
        try:
            logger.warning("serving %s", "it")
        finally:
            request_context.unbind(bound)
    finally:
        logger.removeHandler(handler)
    assert records == ["outside any request", f"serving it [request_id=abc-1 traceparent={TRACEPARENT}]"]
    assert request_context.accept_traceparent("not-a-traceparent") is None


def test_text_logs_of_a_server_carry_the_id(tmp_path: Path) -> None:
    with serving(tmp_path, access_log="true") as server:
        request_id = f"text-log-{time.monotonic_ns()}"
        answer = httpx.post(
            f"{server.url}/generate",
            json={"text": "hi", "max_new_tokens": 1},
            headers={"X-Request-Id": request_id, "traceparent": TRACEPARENT},
            timeout=30,
        )
        assert answer.headers["x-request-id"] == request_id
        deadline = time.monotonic() + 10
        while f"[request_id={request_id} traceparent={TRACEPARENT}]" not in server.log():
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.05)  # another process's log file: nothing to await


def test_refusals_carry_the_id_too(tmp_path: Path) -> None:
    """An API key refusal (HTTP 401, gRPC UNAUTHENTICATED) still says which request it was."""
    with serving(tmp_path, api_key="sesame-0123456789abcdef") as server:
        answer = httpx.post(
            f"{server.url}/generate", json={"text": "hi"}, headers={"X-Request-Id": "no-key-1"}, timeout=30
        )
        assert answer.status_code == 401 and answer.headers["x-request-id"] == "no-key-1"
        request = grpc_text_request(server.model_name, "hi")
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, metadata=(("x-request-id", "no-key-2"),), timeout=30)
            error: Any = caught.value
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert dict(error.initial_metadata())["x-request-id"] == "no-key-2"
