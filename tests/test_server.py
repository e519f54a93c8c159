"""The real KServe ModelServer with the tiny CTranslate2 model, on 127.0.0.1: every protocol
answers, concurrent requests are batched, and batching does not change answers."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import httpx
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REFERENCE_PROMPT, ROOT, FerryProcess
from tests.helpers import grpc_text_request

PROMPTS = [
    REFERENCE_PROMPT,
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived",
    "1 2 3",
    "def fibonacci(n):",
    "Kubernetes schedules pods onto nodes",
]


def batch_sizes(ferry: FerryProcess) -> tuple[float, float]:
    """(sum, count) of the ferry_batch_size histogram."""
    text = httpx.get(f"{ferry.url}/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        if family.name == "ferry_batch_size":
            for sample in family.samples:
                values[sample.name] = sample.value
    return values["ferry_batch_size_sum"], values["ferry_batch_size_count"]


def test_v1_predict(ferry: FerryProcess) -> None:
    body = {"instances": [REFERENCE_PROMPT, {"text": "The quick brown fox", "max_new_tokens": 3}]}
    r = httpx.post(f"{ferry.url}/v1/models/{ferry.model_name}:predict", json=body, timeout=30)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert [p["generated_tokens"] for p in predictions] == [16, 3]  # default_max_new_tokens is 16
    assert all(isinstance(p["generated_text"], str) and p["generated_text"] for p in predictions)


def test_v2_rest_infer(ferry: FerryProcess) -> None:
    body = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [2], "data": PROMPTS[:2]},
            {"name": "max_new_tokens", "datatype": "INT32", "shape": [2], "data": [4, 6]},
        ]
    }
    r = httpx.post(f"{ferry.url}/v2/models/{ferry.model_name}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["generated_text"]["datatype"] == "BYTES" and outputs["generated_text"]["shape"] == [2]
    assert outputs["generated_tokens"]["data"] == [4, 6]


def test_v2_metadata_and_readiness(ferry: FerryProcess) -> None:
    meta = httpx.get(f"{ferry.url}/v2/models/{ferry.model_name}").json()
    assert meta["name"] == ferry.model_name
    assert {i["name"] for i in meta["inputs"]} == {"text", "max_new_tokens"}
    assert meta["parameters"]["kind"] == "tiny" and meta["parameters"]["real_weights"] is False
    assert httpx.get(f"{ferry.url}/v2/models/{ferry.model_name}/ready").json()["ready"] is True
    assert "serving TINY weights" in ferry.log()


def test_v2_grpc_infer(ferry: FerryProcess) -> None:
    with grpc.insecure_channel(ferry.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(pb.ModelReadyRequest(name=ferry.model_name), timeout=10).ready
        response = stub.ModelInfer(grpc_text_request(ferry.model_name, max_new_tokens=5), timeout=30)
        outputs = {o.name: o for o in response.outputs}
        assert len(outputs["generated_text"].contents.bytes_contents) == 1
        assert list(outputs["generated_tokens"].contents.int_contents) == [5]
        with pytest.raises(grpc.RpcError) as caught:  # an empty prompt is refused, naming it
            stub.ModelInfer(grpc_text_request(ferry.model_name, b""), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs.text[0]" in (caught.value.details() or "")


def test_generate_route_takes_the_write_ups_body(ferry: FerryProcess) -> None:
    r = httpx.post(f"{ferry.url}/generate", json={"text": REFERENCE_PROMPT, "max_new_tokens": 10}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["generated_tokens"] == 10
    bad = httpx.post(f"{ferry.url}/generate", json={"text": REFERENCE_PROMPT, "max_new_tokens": 0})
    assert bad.status_code == 400 and "max_new_tokens" in bad.json()["error"]


async def _fire(ferry: FerryProcess, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(
            *(
                client.post(f"{ferry.url}/generate", json={"text": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 8})
                for i in range(n)
            )
        )


def test_concurrent_requests_are_served_in_batches(ferry: FerryProcess) -> None:
    before_sum, before_count = batch_sizes(ferry)
    responses = asyncio.run(_fire(ferry, 48))
    assert all(r.status_code == 200 for r in responses)
    total, batches = batch_sizes(ferry)
    served, formed = total - before_sum, batches - before_count
    assert served == 48
    assert formed < 48 and served / formed > 1, f"{served} requests in {formed} batches"


def test_batching_does_not_change_answers(ferry: FerryProcess) -> None:
    url = f"{ferry.url}/v1/models/{ferry.model_name}:predict"
    alone = []
    for prompt in PROMPTS:
        r = httpx.post(url, json={"instances": [{"text": prompt, "max_new_tokens": 12}]}, timeout=30)
        alone.append(r.json()["predictions"][0]["generated_text"])
    # One request with every prompt: its instances are submitted together, so they share a batch.
    before_sum, before_count = batch_sizes(ferry)
    r = httpx.post(url, json={"instances": [{"text": p, "max_new_tokens": 12} for p in PROMPTS]}, timeout=30)
    together = [p["generated_text"] for p in r.json()["predictions"]]
    total, batches = batch_sizes(ferry)
    # Submitted together, they share the engine's batches: one, or one per slot when two are free.
    assert total - before_sum == len(PROMPTS) and batches - before_count <= 2, "the prompts shared batches"
    assert together == alone
    assert len(set(alone)) > 1, "different prompts give different answers (the test can fail)"


def test_invalid_setting_stops_start_up_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "predictor", "--max-batch-size", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr and "FERRY_MAX_BATCH_SIZE" in result.stderr
