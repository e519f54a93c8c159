"""Safe to put on a network (issue 12), against the real ModelServer on 127.0.0.1, REST and
gRPC: locked control routes, the API key, TLS, header limits, slow clients, limits before
work, no 5xx for client input, clean errors and logs, shutdown in time.

Timings printed with `-s` are the figures docs/security.md quotes."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from tests.conftest import (
    ROOT,
    FerryFactory,
    FerryProcess,
    ensure_tiny_model,
    free_ports,
)
from tests.helpers import INSTANT_ENGINE, grpc_code, grpc_text_request, serving

KEY = "test-key-0123456789abcdef"
SERVICE = "/inference.GRPCInferenceService/"


# ---- helpers ---------------------------------------------------------------------------------


def raw_exchange(port: int, data: bytes, *, read_timeout: float = 10.0) -> tuple[bytes, float]:
    """Sends `data` on a new connection (from a thread: the server may answer before reading
    it all) and returns what came back before the connection closed, and how long that took."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    started = time.monotonic()

    def send() -> None:
        with contextlib.suppress(OSError):  # the server answered and closed while we were sending
            sock.sendall(data)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except OSError:
        pass
    finally:
        elapsed = time.monotonic() - started
        sock.close()
        sender.join(5)
    return received, elapsed


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def timed_get(url: str, **kwargs: Any) -> tuple[int, float]:
    started = time.monotonic()
    r = httpx.get(url, timeout=5, **kwargs)
    return r.status_code, time.monotonic() - started


PROBE_SCRIPT = """
import sys, time, urllib.request
url = sys.argv[1]
while True:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status = response.status
    except Exception:
        status = 0
    print(status, time.monotonic() - started, flush=True)
"""


class ProbeLoop:
    """Polls a URL on new connections from another process (so the test's own work never
    delays the probe) and collects each answer's status and latency. The probe writes to a
    file, not a pipe: a pipe nobody reads until the end fills up and stops the probe."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.statuses: list[int] = []
        self._process: subprocess.Popen[str] | None = None
        self._out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in __exit__)

    def __enter__(self) -> ProbeLoop:
        self._process = subprocess.Popen([sys.executable, "-c", PROBE_SCRIPT, self.url], stdout=self._out, text=True)
        time.sleep(0.3)  # polling by now
        return self

    def __exit__(self, *_: object) -> None:
        assert self._process is not None
        self._process.terminate()
        self._process.wait(timeout=10)
        self._out.seek(0)
        lines = self._out.read().split("\n")[:-1]  # what follows the last newline was cut off
        self._out.close()
        for line in lines:
            status, elapsed = line.split()
            self.statuses.append(int(status))
            self.latencies.append(float(elapsed))


# ---- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerryProcess]:
    """API key set (from a file), control routes enabled."""
    tmp = tmp_path_factory.mktemp("keyed")
    key_file = tmp / "api-key"
    key_file.write_text(KEY + "\n")
    with serving(tmp, api_key_file=key_file, control_routes="true", **INSTANT_ENGINE) as server:
        yield server


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerryProcess]:
    """Defaults (no key), a fast simulated engine."""
    with serving(tmp_path_factory.mktemp("plain"), **INSTANT_ENGINE) as server:
        yield server


def ok(ferry: FerryProcess, key: str | None = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---- 1. control routes -----------------------------------------------------------------------


def test_repository_routes_are_off_by_default_and_the_model_keeps_serving(plain: FerryProcess) -> None:
    for action in ("unload", "load"):
        r = httpx.post(f"{plain.url}/v2/repository/models/{plain.model_name}/{action}", timeout=10)
        assert r.status_code == 404, r.text
    with grpc.insecure_channel(plain.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.RepositoryModelUnloadRequest(model_name=plain.model_name)
        assert grpc_code(lambda: stub.RepositoryModelUnload(request, timeout=10)) == grpc.StatusCode.UNIMPLEMENTED
        assert stub.ModelInfer(grpc_text_request(plain.model_name), timeout=10).outputs
    assert httpx.post(f"{plain.url}/generate", json={"text": "hi"}, timeout=10).status_code == 200
    assert httpx.get(f"{plain.url}/v2/health/live", timeout=10).status_code == 200


def test_control_routes_need_the_key_and_an_unloaded_model_fails_liveness(
    ferry_factory: FerryFactory, tmp_path: Path
) -> None:
    ferry = ferry_factory(api_key=KEY, control_routes="true", **INSTANT_ENGINE)
    unload = f"{ferry.url}/v2/repository/models/{ferry.model_name}/unload"
    assert httpx.post(unload, timeout=10).status_code == 401
    assert httpx.post(unload, headers=ok(ferry, "x" * 24), timeout=10).status_code == 401
    with grpc.insecure_channel(ferry.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.RepositoryModelUnloadRequest(model_name=ferry.model_name)
        assert grpc_code(lambda: stub.RepositoryModelUnload(request, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        # Still serving after the refused unloads.
        assert httpx.get(f"{ferry.url}/v2/health/live", timeout=10).status_code == 200
        r = httpx.post(f"{ferry.url}/generate", json={"text": "hi"}, headers=ok(ferry), timeout=10)
        assert r.status_code == 200
        # With the key the unload happens; from then on liveness fails, so Kubernetes restarts it.
        assert httpx.post(unload, headers=ok(ferry), timeout=10).status_code == 200
        live = httpx.get(f"{ferry.url}/v2/health/live", timeout=10)
        assert live.status_code == 503 and "no longer loaded" in live.json()["error"]
        assert grpc_code(lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=10)) == grpc.StatusCode.UNAVAILABLE


def test_control_routes_without_a_key_stop_start_up() -> None:
    env = {**os.environ, "FERRY_CONTROL_ROUTES": "true", "FERRY_ENGINE": "simulated"}
    result = subprocess.run(
        [sys.executable, "-m", "predictor"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "control_routes: needs an API key" in result.stderr


# ---- 2. API key ------------------------------------------------------------------------------


def inference_calls(ferry: FerryProcess) -> list[tuple[str, str, dict[str, Any] | None]]:
    name = ferry.model_name
    v2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}
    return [
        ("POST", "/generate", {"text": "hi", "max_new_tokens": 2}),
        ("POST", f"/v1/models/{name}:predict", {"instances": ["hi"]}),
        ("POST", f"/v2/models/{name}/infer", v2),
        ("POST", "/openai/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2}),
        ("GET", f"/v2/models/{name}", None),
        ("GET", "/v2", None),
        ("GET", "/v2/models", None),
        ("GET", "/openai/v1/models", None),
    ]


@pytest.mark.parametrize("header", ["authorization", "x-api-key", "api-key"])
def test_every_inference_and_metadata_route_needs_the_key(keyed: FerryProcess, header: str) -> None:
    for method, path, body in inference_calls(keyed):
        url = keyed.url + path
        missing = httpx.request(method, url, json=body, timeout=10)
        wrong_value = "Bearer " + "y" * 24 if header == "authorization" else "y" * 24
        wrong = httpx.request(method, url, json=body, headers={header: wrong_value}, timeout=10)
        for r in (missing, wrong):
            assert r.status_code == 401, (path, r.status_code, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            if path.startswith("/openai/"):
                assert r.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape
            else:
                assert isinstance(r.json()["error"], str)
        good_value = f"Bearer {KEY}" if header == "authorization" else KEY
        r = httpx.request(method, url, json=body, headers={header: good_value}, timeout=10)
        assert r.status_code == 200, (path, r.text)


def test_probes_and_metrics_stay_open(keyed: FerryProcess) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{keyed.model_name}/ready", "/metrics", "/"):
        assert httpx.get(keyed.url + path, timeout=10).status_code == 200, path


def test_grpc_needs_the_key_in_metadata(keyed: FerryProcess) -> None:
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = grpc_text_request(keyed.model_name, max_new_tokens=pb.InferParameter(int64_param=2))
        for metadata in ((), (("authorization", "Bearer " + "z" * 24),), (("authorization", KEY),)):
            code = grpc_code(lambda m=metadata: stub.ModelInfer(request, metadata=m, timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED, metadata
        metadata_request = pb.ModelMetadataRequest(name=keyed.model_name)
        assert grpc_code(lambda: stub.ModelMetadata(metadata_request, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", f"Bearer {KEY}"),)
        assert stub.ModelInfer(request, metadata=good, timeout=10).outputs
        assert stub.ModelMetadata(metadata_request, metadata=good, timeout=10).name == keyed.model_name
        # Probes need none.
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        assert stub.ModelReady(pb.ModelReadyRequest(name=keyed.model_name), timeout=10).ready


def test_openai_client_with_and_without_the_key(keyed: FerryProcess) -> None:
    good = openai.OpenAI(base_url=f"{keyed.url}/openai/v1", api_key=KEY, max_retries=0)
    completion = good.completions.create(model=keyed.model_name, prompt="hi", max_tokens=2)
    assert completion.choices[0].text
    bad = openai.OpenAI(base_url=f"{keyed.url}/openai/v1", api_key="w" * 24, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.completions.create(model=keyed.model_name, prompt="hi", max_tokens=2)
    assert caught.value.code == "invalid_api_key"


def test_key_file_wins_and_short_keys_are_refused(tmp_path: Path) -> None:
    from predictor.settings import Settings

    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    settings = Settings(engine="simulated", api_key="e" * 20, api_key_file=key_file)
    assert settings.api_key is not None and settings.api_key.get_secret_value() == KEY
    assert KEY not in repr(settings)  # a SecretStr: never printed
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings(engine="simulated", api_key="short")
    with pytest.raises(ValueError, match="cannot read"):
        Settings(engine="simulated", api_key_file=tmp_path / "missing")


# ---- 3. TLS ----------------------------------------------------------------------------------


def self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "tls.crt", tmp / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_https_and_grpc_tls_from_kserves_flags(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    http_port, grpc_port = free_ports(2)
    env = {**os.environ, "FERRY_HOST": "127.0.0.1", "FERRY_MODEL_DIR": str(ensure_tiny_model()), **{
        f"FERRY_{k.upper()}": str(v) for k, v in INSTANT_ENGINE.items()}}
    log_path = tmp_path / "tls.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "predictor", "--http_port", str(http_port), "--grpc_port", str(grpc_port),
             "--ssl_certfile", str(cert), "--ssl_keyfile", str(key)],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = f"https://127.0.0.1:{http_port}"
        trust = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/v2/health/ready", verify=trust, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        r = httpx.post(f"{url}/generate", json={"text": "hi", "max_new_tokens": 2}, verify=trust, timeout=10)
        assert r.status_code == 200
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served on the TLS port
            httpx.get(f"http://127.0.0.1:{http_port}/v2/health/live", timeout=3)
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        options = (("grpc.ssl_target_name_override", "localhost"),)
        with grpc.secure_channel(f"127.0.0.1:{grpc_port}", credentials, options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(grpc_text_request("opt-125m"), timeout=10).outputs
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert grpc_code(lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=3)) != grpc.StatusCode.OK
        # A rotated certificate (a renewed Secret) is served without a restart, REST and gRPC.
        rotated = tmp_path / "rotated"
        rotated.mkdir()
        new_cert, new_key = self_signed(rotated)
        key.write_bytes(new_key.read_bytes())
        cert.write_bytes(new_cert.read_bytes())
        new_trust = ssl.create_default_context(cafile=str(new_cert))
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{url}/v2/health/live", verify=new_trust, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "REST never served the rotated certificate"
                time.sleep(0.2)  # KServe's watcher reloads it: poll
        credentials = grpc.ssl_channel_credentials(root_certificates=new_cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{grpc_port}", credentials, options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    finally:
        process.kill()
        process.wait()


def test_half_a_tls_configuration_stops_start_up(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    env = {**os.environ, "FERRY_ENGINE": "simulated", "FERRY_HOST": "127.0.0.1"}
    http_port, grpc_port = free_ports(2)
    result = subprocess.run(
        [sys.executable, "-m", "predictor", "--http_port", str(http_port), "--grpc_port", str(grpc_port),
         "--ssl_certfile", str(cert)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "--ssl_certfile and --ssl_keyfile must be given together" in result.stderr


# ---- 4. headers and limits before work -------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * 100_000 + b"\r\n",
        b"X-Big: " + b"a" * 1_000_000 + b"\r\n",
        b"X-Big: " + b"a" * 8_000_000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)),
        b"".join(b"X-H%d: v\r\n" % i for i in range(101)),
    ],
    ids=["100KB", "1MB", "8MB", "10000-headers", "101-headers"],
)
def test_oversized_or_too_many_headers_get_431(plain: FerryProcess, headers: bytes) -> None:
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    response, elapsed = raw_exchange(plain.http_port, request)
    assert status_of(response) == 431, response[:200]
    assert elapsed < 5
    assert httpx.get(f"{plain.url}/v2/health/live", timeout=5).status_code == 200


def test_long_url_gets_431(plain: FerryProcess) -> None:
    response, _ = raw_exchange(plain.http_port, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(response) == 431


def test_prompt_over_the_character_bound_is_refused_before_tokenising(plain: FerryProcess) -> None:
    from predictor.protocols.requests import MAX_CHARS_PER_TOKEN

    bound = 1024 * MAX_CHARS_PER_TOKEN
    started = time.monotonic()
    r = httpx.post(f"{plain.url}/generate", json={"text": "a" * (bound + 1)}, timeout=10)
    assert r.status_code == 400 and f"the limit is {bound}" in r.json()["error"]
    assert time.monotonic() - started < 1


def test_a_1mb_prompt_never_holds_the_loop(plain: FerryProcess) -> None:
    """A 1 MB prompt (refused before tokenising) and 1 MB of prompts each under the character
    bound (tokenised off the loop, then refused as too many tokens) on every HTTP protocol,
    while a liveness probe polls: the probe never waits 150 ms."""
    name = plain.model_name
    words = ("lorem ipsum dolor sit amet " * 2500)[:66_000]  # ~13k tokens, under the character bound
    bodies = [
        ("/generate", {"text": "b" * 1_000_000}),
        ("/generate", {"text": words}),
        (f"/v1/models/{name}:predict", {"instances": [words] * 15}),
        ("/openai/v1/completions", {"model": name, "prompt": [words] * 15, "max_tokens": 2}),
        (f"/v2/models/{name}/infer", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [15],
                                                  "data": [words] * 15}]}),
        # Many small items instead of long strings: parsing them is the work.
        (f"/v1/models/{name}:predict", {"instances": ["a"] * 150_000}),
        (f"/v2/models/{name}/infer", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [150_000],
                                                  "data": ["a"] * 150_000}]}),
    ]  # fmt: skip
    with ProbeLoop(f"{plain.url}/v2/health/live") as probe:
        for path, body in bodies:
            started = time.monotonic()
            r = httpx.post(plain.url + path, json=body, timeout=30)
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
            took = time.monotonic() - started
            print(f"\n{path}: {len(json.dumps(body)) / 1e6:.2f} MB -> {r.status_code} in {took:.3f} s")
        time.sleep(0.2)
    worst = max(probe.latencies)
    print(f"liveness probe: {len(probe.latencies)} polls, slowest {worst * 1000:.1f} ms")
    assert set(probe.statuses) == {200} and worst < 0.150


def test_a_7mb_grpc_prompt_is_refused_fast(plain: FerryProcess) -> None:
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(plain.grpc_target, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with ProbeLoop(f"{plain.url}/v2/health/live") as probe:
            started = time.monotonic()
            code = grpc_code(lambda: stub.ModelInfer(grpc_text_request(plain.model_name, "c" * 7_000_000), timeout=30))
            elapsed = time.monotonic() - started
        print(f"\n7 MB gRPC prompt: {code.name} in {elapsed:.3f} s; slowest probe {max(probe.latencies) * 1000:.1f} ms")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and elapsed < 1.5
        # Just over the HTTP body limit is refused the same way: one byte limit for both.
        code = grpc_code(lambda: stub.ModelInfer(grpc_text_request(plain.model_name, "c" * 1_100_000), timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_character_bound_covers_the_vocabulary() -> None:
    from predictor.protocols.requests import MAX_CHARS_PER_TOKEN
    from predictor.tokenizer import byte_of_character, gpt2_vocabulary

    decoder = byte_of_character()  # checked against Hugging Face's tokens in test_tokenizer.py
    longest = max(len(bytes(decoder[c] for c in token).decode("utf-8", "replace")) for token in gpt2_vocabulary())
    assert longest <= MAX_CHARS_PER_TOKEN


# ---- 5. no 5xx for client input --------------------------------------------------------------


def chunks(total: int, size: int = 8192) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


def test_chunked_body_over_the_limit_is_413_on_every_route(ferry_factory: FerryFactory) -> None:
    ferry = ferry_factory(max_body_bytes=4096, **INSTANT_ENGINE)
    name = ferry.model_name
    paths = [
        "/generate",
        f"/v1/models/{name}:predict",
        f"/v2/models/{name}/infer",
        "/openai/v1/completions",
        "/openai/v1/chat/completions",
        f"/v2/models/{name}/versions/1/infer",  # any route FastAPI serves
    ]
    for path in paths:
        headers = {"content-type": "application/json"}
        r = httpx.post(ferry.url + path, content=chunks(20_000), headers=headers, timeout=10)
        assert r.status_code == 413, (path, r.status_code, r.text)
        body = r.json()
        assert "4096" in (body["error"]["message"] if path.startswith("/openai/") else body["error"])


def test_v2_rest_input_classes_are_4xx(plain: FerryProcess) -> None:
    url = f"{plain.url}/v2/models/{plain.model_name}/infer"
    surrogate = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a\\ud800b"]}]}'
    r = httpx.post(url, content=surrogate, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code in (400, 422), r.text  # a lone surrogate is not text
    header = json.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}
    ).encode()
    raw_text = len(b"hello").to_bytes(4, "little") + b"hello"
    cases = [
        ("abc", header + raw_text),
        ("-5", header + raw_text),
        (str(len(header) + 1000), header + raw_text),
        ("0", header + raw_text),
        (str(len(b'{"id": "x"}')), b'{"id": "x"}' + raw_text),  # no inputs
        (str(len(b"[1, 2]")), b"[1, 2]"),
        (str(len(header)), header + raw_text[:5]),  # binary sizes do not add up
        (str(len(header)), header + (1000).to_bytes(4, "little") + b"hello"),  # a string longer than its data
        (str(len(header) - 3), header + raw_text),  # the JSON header cut short
    ]
    for value, body in cases:
        r = httpx.post(url, content=body, headers={"inference-header-content-length": value,
                                                   "content-type": "application/octet-stream"}, timeout=10)  # fmt: skip
        assert 400 <= r.status_code < 500, (value, body[:80], r.status_code, r.text)
        assert "Error" not in r.json()["error"], r.text  # no exception class names
    good = header + raw_text
    r = httpx.post(url, content=good, headers={"inference-header-content-length": str(len(header)),
                                               "content-type": "application/octet-stream"}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text


def test_grpc_parameter_kinds_are_invalid_argument_not_internal(plain: FerryProcess) -> None:
    with grpc.insecure_channel(plain.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name, parameter in [
            ("max_new_tokens", pb.InferParameter(string_param="5")),
            ("max_new_tokens", pb.InferParameter(bool_param=True)),
            ("timeout_s", pb.InferParameter(string_param="soon")),
            ("timeout_s", pb.InferParameter(bool_param=False)),
        ]:
            request = grpc_text_request(plain.model_name, **{name: parameter})
            try:
                stub.ModelInfer(request, timeout=10)
                raise AssertionError(f"{name}={parameter} was accepted")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.code(), err.details())
                assert name in (err.details() or "")
        request = grpc_text_request(plain.model_name, max_new_tokens=pb.InferParameter(int64_param=3))
        assert list(stub.ModelInfer(request, timeout=10).outputs[1].contents.int_contents) == [3]
        bad_raw = pb.ModelInferRequest(
            model_name=plain.model_name,
            inputs=[pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[3])],
            raw_input_contents=[b"\x05\x00\x00\x00ab"],
        )
        assert grpc_code(lambda: stub.ModelInfer(bad_raw, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("extra", "status"),
    [({"top_k": 10**12}, 400), ({"top_k": 100_000}, 400), ({"top_k": 2**64}, 400), ({"top_k": -5}, 400),
     ({"top_p": 1e-320}, 400), ({"top_p": 0}, 400), ({"temperature": 1e-320}, 200), ({"top_k": 50_272}, 200),
     ({"top_k": 5, "top_p": 0.5, "temperature": 1e-300}, 200)],
)  # fmt: skip
def test_sampling_values_the_engine_rejects_are_400_naming_the_field(
    ferry: FerryProcess, extra: dict[str, Any], status: int
) -> None:
    """CTranslate2 raises on these (failing the whole batch): they are refused up front."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for path, prompt in (("/openai/v1/completions", {"prompt": "hi"}), ("/openai/v1/chat/completions", chat)):
        body = {"model": ferry.model_name, "max_tokens": 2, **prompt, **extra}
        r = httpx.post(ferry.url + path, json=body, timeout=30)
        assert r.status_code == status, (path, extra, r.status_code, r.text)
        if status == 400:
            assert r.json()["error"]["param"] in extra, r.text


# ---- 6. clean errors and logs ----------------------------------------------------------------


def test_client_errors_log_no_traceback_and_no_forged_lines(ferry_factory: FerryFactory) -> None:
    ferry = ferry_factory(**INSTANT_ENGINE)
    forged = "FORGED-LINE ferry.server ERROR everything is on fire"
    before = ferry.log()
    assert httpx.get(f"{ferry.url}/v2/models/x%0a{forged.replace(' ', '%20')}/ready", timeout=10).status_code == 404
    r = httpx.post(f"{ferry.url}/v2/models/x%0d%0a{forged.replace(' ', '%20')}/infer", json={"inputs": []}, timeout=10)
    assert r.status_code in (400, 404)
    assert httpx.post(f"{ferry.url}/generate", json={"text": ""}, timeout=10).status_code == 400
    r = httpx.post(f"{ferry.url}/v2/models/{ferry.model_name}/infer", json={"inputs": 3}, timeout=10)
    assert r.status_code == 422
    big = "k" * 900_000
    r = httpx.post(f"{ferry.url}/generate", json={"text": "hi", big: 1}, timeout=10)
    assert r.status_code == 400 and len(r.text) < 2_000, len(r.text)
    r = httpx.post(f"{ferry.url}/openai/v1/completions", json={"model": big, "prompt": "hi"}, timeout=10)
    assert r.status_code in (400, 404) and len(r.text) < 2_000, len(r.text)
    named_big = {"inputs": [{"name": big, "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    r = httpx.post(f"{ferry.url}/v2/models/{ferry.model_name}/infer", json=named_big, timeout=10)
    assert r.status_code == 400 and len(r.text) < 2_000
    with grpc.insecure_channel(ferry.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model in (ferry.model_name, f"x\n{forged}"):
            grpc_code(lambda m=model: stub.ModelInfer(grpc_text_request(m, ""), timeout=10))
        assert grpc_code(lambda: stub.ModelInfer(grpc_text_request(ferry.model_name, ""), timeout=10)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    time.sleep(0.5)  # the log file is written by another process
    log = ferry.log()[len(before):]
    assert "Traceback" not in log, log[-3000:]
    assert not any(line.startswith("FORGED") for line in log.splitlines()), log[-3000:]
    assert all(len(line) < 2_500 for line in log.splitlines())


def test_unexpected_errors_answer_an_error_id_without_internal_text() -> None:
    from predictor.front.app import plain_error
    from predictor.protocols.openai import error_status_and_body

    status, body = plain_error(TypeError("secret internals"))
    assert status == 500 and "secret" not in body["error"] and "TypeError" not in body["error"]
    assert "error id" in body["error"]
    status, body = error_status_and_body(KeyError("secret internals"))
    assert status == 500 and "secret" not in body["error"]["message"]


def test_log_filter_escapes_and_truncates() -> None:
    import logging

    from predictor.logsafe import SafeLogFilter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "model %s", ("a\nFORGED" + "z" * 5000,), None)
    SafeLogFilter().filter(record)
    message = record.getMessage()
    assert "\n" not in message and "\\nFORGED" in message and len(message) < 2_100


# ---- 7. slow clients -------------------------------------------------------------------------


def test_stalled_requests_are_cut_off_while_probes_answer_with_the_cap_full(ferry_factory: FerryFactory) -> None:
    ferry = ferry_factory(
        header_timeout_s=1, body_timeout_s=2, max_connections=16, args=["--timeout-keep-alive", "2"], **INSTANT_ENGINE
    )
    stalled: list[tuple[str, socket.socket, float]] = []
    for i in range(16):
        sock = socket.create_connection(("127.0.0.1", ferry.http_port), timeout=10)
        # (The 16th connection is the cap itself: one that completes its headers there is answered
        # 503 at once, so the last ones opened are those that never do.)
        if i % 4 == 3:
            kind, data = "idle", b""
        elif i % 4 == 2:
            kind, data = "partial-headers", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Le"
        elif i % 4 == 0:
            kind, data = "short-body", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"te"
        else:
            kind, data = "chunked-unfinished", (
                b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"tex\r\n"
            )
        sock.sendall(data)
        stalled.append((kind, sock, time.monotonic()))
    # The cap (16) is full of stalled sockets: probes are still answered, at once.
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{ferry.model_name}/ready", "/metrics"):
        status, elapsed = timed_get(ferry.url + path)
        print(f"\n{path} with the cap full: {status} in {elapsed * 1000:.1f} ms")
        assert status == 200 and elapsed < 1.0
    assert httpx.get(f"{ferry.url}/v2/models/{ferry.model_name}", timeout=5).status_code == 503  # the cap is real
    closed: dict[int, tuple[float, bytes]] = {}

    def wait_closed(index: int, sock: socket.socket) -> None:
        sock.settimeout(10)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                answer += chunk
        closed[index] = (time.monotonic(), answer)

    readers = [threading.Thread(target=wait_closed, args=(i, sock)) for i, (_, sock, _) in enumerate(stalled)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(15)
    cut: dict[str, float] = {}
    for i, (kind, sock, opened) in enumerate(stalled):
        closed_at, answer = closed[i]
        cut[kind] = max(cut.get(kind, 0.0), closed_at - opened)
        if kind != "idle":
            assert status_of(answer) == 408, (kind, answer[:200])
        sock.close()
    print("cut off after (s):", {k: round(v, 2) for k, v in cut.items()})
    assert cut["idle"] < 1 + 1 and cut["partial-headers"] < 1 + 1
    assert cut["short-body"] < 2 + 1 and cut["chunked-unfinished"] < 2 + 1
    # An idle keep-alive connection closes after --timeout-keep-alive (2 s here, KServe's flag).
    sock = socket.create_connection(("127.0.0.1", ferry.http_port), timeout=10)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    answered = sock.recv(4096)
    idle_since = time.monotonic()
    while sock.recv(4096):
        pass
    idle_for = time.monotonic() - idle_since
    sock.close()
    print(f"keep-alive connection closed after {idle_for:.2f} s idle")
    assert status_of(answered) == 200 and 1.5 < idle_for < 2 + 1
    r = httpx.post(f"{ferry.url}/generate", json={"text": "hi"}, timeout=10)
    assert r.status_code == 200


def test_probes_answer_with_the_cap_full_of_busy_clients(ferry_factory: FerryFactory) -> None:
    ferry = ferry_factory(engine="simulated", sim_prefill_s=2.0, sim_step_s=0, sim_step_per_seq_s=0,
                          max_connections=16, max_batch_size=64)  # fmt: skip

    stop = threading.Event()

    def busy() -> None:
        # Ask again until told to stop: a client that met the cap while the poll below held the
        # last connection got a 503 and would otherwise leave the cap one short for good.
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{ferry.url}/generate", json={"text": "hi"}, timeout=30)

    clients = [threading.Thread(target=busy, daemon=True) for _ in range(16)]
    for client in clients:
        client.start()
    try:
        deadline = time.monotonic() + 20
        while httpx.get(f"{ferry.url}/v2/models/{ferry.model_name}", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "the cap never filled"
            time.sleep(0.02)  # another process's state: poll it
        for path in ("/v2/health/live", f"/v2/models/{ferry.model_name}/ready"):
            status, elapsed = timed_get(ferry.url + path)
            assert status == 200 and elapsed < 1.0, (path, status, elapsed)
    finally:
        stop.set()
        for client in clients:
            client.join(30)


def test_default_timeouts_cut_a_stalled_request_within_30_s() -> None:
    from predictor.settings import Settings

    defaults = Settings(engine="simulated")
    assert defaults.header_timeout_s + defaults.body_timeout_s <= 30


# ---- 8. shutdown in time ---------------------------------------------------------------------


def test_sigterm_with_stalled_sockets_exits_in_time_answering_503_until_then(ferry_factory: FerryFactory) -> None:
    grace = 3.0
    ferry = ferry_factory(engine="simulated", sim_prefill_s=1.5, sim_step_s=0, sim_step_per_seq_s=0,
                          drain_grace_s=grace, header_timeout_s=60, body_timeout_s=60)  # fmt: skip
    stalled = []
    for data in (b"", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
                 b"GET /v2/health/li"):  # fmt: skip
        sock = socket.create_connection(("127.0.0.1", ferry.http_port), timeout=30)
        sock.sendall(data)
        stalled.append(sock)
    in_flight = threading.Thread(
        target=lambda: httpx.post(f"{ferry.url}/generate", json={"text": "hi"}, timeout=30), daemon=True
    )
    in_flight.start()
    time.sleep(0.3)
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()

    def knock() -> None:  # new connections until the process is gone
        while not stop.is_set():
            try:
                r = httpx.post(f"{ferry.url}/generate", json={"text": "hi"}, timeout=5)
                retry = "retry-after" in r.headers
                outcomes.append((time.monotonic(), f"{r.status_code}{'+retry' if retry else ''}"))
            except httpx.ConnectError:
                outcomes.append((time.monotonic(), "refused"))
            except httpx.TransportError as exc:
                outcomes.append((time.monotonic(), type(exc).__name__))
            time.sleep(0.02)

    knocker = threading.Thread(target=knock, daemon=True)
    started = time.monotonic()
    ferry.process.send_signal(signal.SIGTERM)
    knocker.start()
    code = ferry.process.wait(timeout=grace + 30)
    exited = time.monotonic()
    time.sleep(0.3)
    stop.set()
    knocker.join(10)
    for sock in stalled:
        sock.close()
    took = exited - started
    kinds = sorted({o for _, o in outcomes})
    print(f"\nSIGTERM -> exit {code} in {took:.2f} s (grace {grace} s) with 3 stalled sockets; answers: {kinds}")
    assert code == 0 and took < grace + 5
    during = [o for t, o in outcomes if t < exited - 0.5]
    assert during and set(during) <= {"503+retry", "200"}, outcomes


# ---- composing with KServe and uvicorn -------------------------------------------------------

# ferry's start-up re-does KServe's ModelServer.start (to bind the host, add its front, guard
# and TLS for gRPC) and subclasses the pieces below. If KServe or uvicorn change one of them,
# this fails: read the new code, carry what changed into predictor/server.py,
# predictor/front/guard.py or predictor/front/kserve_errors.py, then update the hash.
PINNED = {
    "kserve ModelServer.start": "efa96502018b04e9",
    "kserve RESTServer.__init__": "c85b4ca79cab7f7c",
    "kserve RESTServer.create_application": "f821f63b402457eb",
    "kserve RESTServer._register_endpoints": "841b714394633cb5",
    "kserve RESTServer._add_exception_handlers": "ca0a28c1b356a6eb",
    "kserve GRPCServer.start": "f4ea7b4eb6f0d9f7",
    "kserve InferenceServicer.ModelInfer": "49bf48c9159ebe9f",
    "kserve DataPlane.decode_inference_request": "d9b169889aa3e564",
    "uvicorn HttpToolsProtocol.data_received": "010a7ae59a5d3b1a",
    "uvicorn HttpToolsProtocol.on_headers_complete": "1ea8589acfad92d8",
    "uvicorn HttpToolsProtocol.on_body": "dba9c32aeba35b6a",
    "uvicorn HttpToolsProtocol.on_message_complete": "1fbad42dc31fc01f",
    "uvicorn Server.shutdown": "9b33c50562992b1e",
}


def test_the_kserve_and_uvicorn_code_ferry_builds_on_is_unchanged() -> None:
    import kserve.model_server as model_server
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.rest.server import RESTServer
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import Server

    code = {
        "kserve ModelServer.start": model_server.ModelServer.start,
        "kserve RESTServer.__init__": RESTServer.__init__,
        "kserve RESTServer.create_application": RESTServer.create_application,
        "kserve RESTServer._register_endpoints": RESTServer._register_endpoints,
        "kserve RESTServer._add_exception_handlers": RESTServer._add_exception_handlers,
        "kserve GRPCServer.start": GRPCServer.start,
        "kserve InferenceServicer.ModelInfer": InferenceServicer.ModelInfer,
        "kserve DataPlane.decode_inference_request": DataPlane.decode_inference_request,
        "uvicorn HttpToolsProtocol.data_received": HttpToolsProtocol.data_received,
        "uvicorn HttpToolsProtocol.on_headers_complete": HttpToolsProtocol.on_headers_complete,
        "uvicorn HttpToolsProtocol.on_body": HttpToolsProtocol.on_body,
        "uvicorn HttpToolsProtocol.on_message_complete": HttpToolsProtocol.on_message_complete,
        "uvicorn Server.shutdown": Server.shutdown,
    }
    changed = [
        name
        for name, function in code.items()
        if hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16] != PINNED[name]
    ]
    assert not changed, f"changed upstream, review ferry's copy or subclass: {changed}"
