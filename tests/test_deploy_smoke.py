"""Pod-spec smoke test: run the chart's rendered predictor container as a local process.

The command, args, env, ports and probe paths all come from the rendered InferenceService; only
what cannot hold on this machine is swapped, and each swap is listed here:
- FERRY_MODEL_DIR /mnt/models -> models/tiny (the storage-initializer's job in a cluster),
- FERRY_HOST=127.0.0.1 added (tests listen on loopback only),
- FERRY_DEVICE cuda -> cpu for the GPU scenario (no GPU here),
- the rendered ports (8080/8081) are swapped for free ports only when they are already taken on
  this shared machine; args and probe ports are rewritten together, and the test prints it.
`python` is resolved through PATH with the project's venv first, as the image's venv is in a pod.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from deploy import chart
from tests.conftest import REFERENCE_PROMPT, ROOT, ensure_tiny_model, free_port
from tests.helpers import grpc_text_request


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def rendered_container(scenario: str) -> dict[str, Any]:
    objects = chart.render_objects(chart.load_values(chart.scenarios()[scenario]), name="ferry")
    (isvc,) = chart.find(objects, "InferenceService")
    (container,) = isvc["spec"]["predictor"]["containers"]
    return container


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", ["cpu", "gpu-knative"])
def test_rendered_pod_spec_serves_every_protocol(scenario: str, tmp_path: Path) -> None:
    container = rendered_container(scenario)
    command = list(container["command"]) + list(container.get("args", []))
    ready = container["readinessProbe"]["httpGet"]
    live = container["livenessProbe"]["httpGet"]
    http_port, grpc_port = 8080, 8081
    assert f"--http_port={http_port}" in command and f"--grpc_port={grpc_port}" in command
    assert ready["port"] == live["port"] == http_port
    if not (port_is_free(http_port) and port_is_free(grpc_port)):
        new_http, new_grpc = free_port(), free_port()
        print(f"ports 8080/8081 taken here: swapped for {new_http}/{new_grpc}")
        command = [
            a.replace(f"={http_port}", f"={new_http}") if a.startswith("--http_port") else a
            for a in command
        ]
        command = [
            a.replace(f"={grpc_port}", f"={new_grpc}") if a.startswith("--grpc_port") else a
            for a in command
        ]
        http_port, grpc_port = new_http, new_grpc

    env = {e["name"]: str(e["value"]) for e in container["env"]}
    assert env["FERRY_MODEL_DIR"] == "/mnt/models"
    env["FERRY_MODEL_DIR"] = str(ensure_tiny_model())
    env["FERRY_HOST"] = "127.0.0.1"
    if env["FERRY_DEVICE"] == "cuda":
        env["FERRY_DEVICE"] = "cpu"
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(tmp_path)
    model = env["FERRY_MODEL_NAME"]
    url = f"http://127.0.0.1:{http_port}"

    log_path = tmp_path / "ferry.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = httpx.get(url + ready["path"], timeout=1).status_code
                if status == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # another process's readiness: nothing to wait on but the probe
        assert status == 200, f"readiness {ready['path']} never 200:\n{log_path.read_text()}"
        assert httpx.get(url + live["path"], timeout=5).status_code == 200

        body = {"text": REFERENCE_PROMPT, "max_new_tokens": 4}
        generated = httpx.post(f"{url}/generate", json=body, timeout=30)
        assert generated.status_code == 200 and generated.json()["generated_tokens"] == 4

        v1 = httpx.post(
            f"{url}/v1/models/{model}:predict", json={"instances": [REFERENCE_PROMPT]}, timeout=30
        )
        assert v1.status_code == 200 and len(v1.json()["predictions"]) == 1

        v2_body = {
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [1], "data": [REFERENCE_PROMPT]}
            ],
            "parameters": {"max_new_tokens": 3},
        }
        v2 = httpx.post(f"{url}/v2/models/{model}/infer", json=v2_body, timeout=30)
        assert v2.status_code == 200
        assert {o["name"] for o in v2.json()["outputs"]} >= {"generated_text", "generated_tokens"}

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = grpc_text_request(model, max_new_tokens=2)
            outputs = {o.name: o for o in stub.ModelInfer(request, timeout=30).outputs}
            assert list(outputs["generated_tokens"].contents.int_contents) == [2]

        metrics = httpx.get(f"{url}/metrics", timeout=5).text  # prometheus.kserve.io/path
        assert "ferry_queue_depth" in metrics and "ferry_requests_in_flight" in metrics

        # SIGTERM as the kubelet sends it: drains and exits 0 within FERRY_DRAIN_GRACE_S
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=float(env["FERRY_DRAIN_GRACE_S"]) + 10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
