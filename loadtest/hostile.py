"""Hostile and careless clients for `make reliability` (issue 12): stalled sockets against the
connection cap, SIGTERM with stalled sockets, and one request of each input class that used
to take a pod out or answer 5xx. Plain sockets, urllib and grpc: what each class sends is
exactly what is written here. The scenarios that run these live in `loadtest.reliability`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from loadtest.harness import HOST, Server, http_get

# What a stalled client has sent when it stops sending. (Opened in this order, round-robin: at
# the cap itself a request whose headers are complete is answered 503 at once, so the last
# ones opened are those that never complete their headers.)
STALLS: dict[str, bytes] = {
    "short_body": (
        b"POST /generate HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/json\r\n"
        b"Content-Length: 200\r\n\r\n{\"text\": "
    ),
    "unfinished_chunked": (
        b"POST /generate HTTP/1.1\r\nHost: ferry\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{\"text\":\r\n"
    ),
    "partial_headers": b"POST /generate HTTP/1.1\r\nHost: ferry\r\nContent-Ty",
    "idle": b"",
}
# Which read timeout cuts each kind.
CUT_BY = {"idle": "header", "partial_headers": "header", "short_body": "body", "unfinished_chunked": "body"}


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0


def raw_exchange(port: int, data: bytes, timeout_s: float = 15.0) -> tuple[int, float, bytes]:
    """`data` on a new connection, sent from a thread (the server may answer before it has read
    it all); the status that came back, the seconds until the connection closed, the answer."""
    sock = socket.create_connection((HOST, port), timeout=timeout_s)
    started = time.monotonic()

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    answer = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            answer += chunk
    elapsed = time.monotonic() - started
    sock.close()
    sender.join(5)
    return status_of(answer), elapsed, answer


def http_call(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout_s: float = 15.0
) -> tuple[int, bytes]:
    method = "POST" if body is not None else "GET"
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # loopback only
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def timed_get(url: str) -> tuple[int, float]:
    started = time.monotonic()
    try:
        status = http_get(url, timeout=5)[0]
    except OSError:
        status = 0
    return status, time.monotonic() - started


def _wait_closed(sock: socket.socket, into: dict[str, Any]) -> None:
    answer = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(4096):
            answer += chunk
    into["closed_at"] = time.monotonic()
    into["status"] = status_of(answer)


# ---- slow clients --------------------------------------------------------------------------------


def slow_clients(
    server: Server, *, cap: int, header_timeout_s: float, body_timeout_s: float, model: str
) -> dict[str, Any]:
    """Fills the connection cap with stalled sockets (the four kinds in turn), probes liveness
    and readiness while they are held, times when each is cut off, then checks that ordinary
    requests are served again."""
    kinds = list(STALLS)
    held: list[tuple[str, socket.socket, float, dict[str, Any]]] = []
    for i in range(cap):
        kind = kinds[i % len(kinds)]
        sock = socket.create_connection((HOST, server.port), timeout=header_timeout_s + body_timeout_s + 30)
        sock.sendall(STALLS[kind])
        state: dict[str, Any] = {}
        held.append((kind, sock, time.monotonic(), state))
        threading.Thread(target=_wait_closed, args=(sock, state), daemon=True).start()
    # While every stalled socket is held (the first are cut at the header timeout).
    hold_until = held[0][2] + header_timeout_s - 0.3
    probes: list[tuple[int, float]] = []
    others: list[int] = []
    generate = json.dumps({"text": "hi", "max_new_tokens": 2}).encode()
    while time.monotonic() < hold_until:
        for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{model}/ready"):
            probes.append(timed_get(server.url + path))
        with contextlib.suppress(OSError):
            others.append(http_call(server.url + "/generate", generate, {"Content-Type": "application/json"})[0])
        time.sleep(0.05)
    deadline = time.monotonic() + body_timeout_s + 15
    for _, sock, _, state in held:
        while "closed_at" not in state and time.monotonic() < deadline:
            time.sleep(0.05)  # another process closes them: poll
        sock.close()
    cut_s: dict[str, float] = {}
    answered: dict[str, list[int]] = {}
    for kind, _, opened, state in held:
        cut_s[kind] = max(cut_s.get(kind, 0.0), state.get("closed_at", float("inf")) - opened)
        answered.setdefault(kind, []).append(state.get("status", -1))
    json_type = {"Content-Type": "application/json"}
    after = [http_call(server.url + "/generate", generate, json_type)[0] for _ in range(20)]
    latencies = [elapsed for _, elapsed in probes]
    return {
        "stalled_sockets": cap,
        "probes": len(probes),
        "probe_statuses": sorted({status for status, _ in probes}),
        "probe_p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "probe_max_ms": 1000 * max(latencies) if latencies else float("nan"),
        "other_requests_while_full": {str(s): others.count(s) for s in sorted(set(others))},
        "cut_off_s": {kind: round(seconds, 2) for kind, seconds in cut_s.items()},
        "cut_off_limit_s": {kind: header_timeout_s if CUT_BY[kind] == "header" else body_timeout_s for kind in kinds},
        "answered": {kind: sorted(set(statuses)) for kind, statuses in answered.items()},
        "after": {str(s): after.count(s) for s in sorted(set(after))},
    }


def sigterm_with_stalled(server: Server, grace_s: float) -> dict[str, Any]:
    """SIGTERM with one stalled socket of each kind open and new requests knocking: how long
    until the process exits, and what the knocks were answered."""
    stalled = []
    for data in STALLS.values():
        sock = socket.create_connection((HOST, server.port), timeout=grace_s + 30)
        sock.sendall(data)
        stalled.append(sock)
    answers: list[tuple[float, str]] = []
    stop = threading.Event()
    generate = json.dumps({"text": "hi", "max_new_tokens": 2}).encode()

    def knock() -> None:
        while not stop.is_set():
            try:
                status, _ = http_call(server.url + "/generate", generate, {"Content-Type": "application/json"}, 5)
                answers.append((time.monotonic(), str(status)))
            except urllib.error.URLError as exc:
                refused = isinstance(exc.reason, ConnectionRefusedError)
                answers.append((time.monotonic(), "refused" if refused else type(exc.reason).__name__))
            except OSError as exc:
                answers.append((time.monotonic(), type(exc).__name__))
            time.sleep(0.02)

    knocker = threading.Thread(target=knock, daemon=True)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    knocker.start()
    try:
        code: int | None = server.process.wait(timeout=grace_s + 30)
    except Exception:
        code = None
    exited = time.monotonic()
    time.sleep(0.2)
    stop.set()
    knocker.join(10)
    for sock in stalled:
        sock.close()
    before_exit = [kind for at, kind in answers if at < exited - 0.5]
    return {
        "grace_s": grace_s,
        "exit_code": code,
        "sigterm_to_exit_s": round(exited - started, 2),
        "answers_before_exit": {k: before_exit.count(k) for k in sorted(set(before_exit))},
    }


# ---- input classes -------------------------------------------------------------------------------


def _grpc_text(model: str, text: bytes, **parameters: Any) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[text])
            )
        ],
        parameters=parameters,
    )


def _grpc(call: Callable[[], Any]) -> str:
    try:
        call()
    except grpc.RpcError as err:
        return str(err.code().name)
    return "OK"


def _chunked(path: str, size: int, key: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: ferry\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    chunk = b" " * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(size // len(chunk) + 1))
    return head + body + b"0\r\n\r\n"


@dataclass
class _Classes:
    """The input classes sent so far, each as (class, expected answer, answer)."""

    server: Server
    key: str
    model: str
    results: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}

    def expect(self, name: str, expected: str, got: int | str) -> None:
        self.results.append((name, expected, str(got)))

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> int:
        """POSTs with the API key (and `headers` over the defaults); the status."""
        return http_call(self.server.url + path, body, {**self.auth, **(headers or {})})[0]


SIMPLE = json.dumps({"text": "hi", "max_new_tokens": 2}).encode()


def _credentials(c: _Classes) -> None:
    """No key, a wrong key, and the model-control routes with and without one."""
    url, model = c.server.url, c.model
    c.expect("no API key", "401", http_call(url + "/generate", SIMPLE, {"Content-Type": "application/json"})[0])
    c.expect("wrong API key", "401", c.post("/generate", SIMPLE, {"Authorization": "Bearer " + "x" * 24}))
    c.expect("REST unload without a key", "401", http_call(f"{url}/v2/repository/models/{model}/unload", b"")[0])
    c.expect("REST unload with the key (routes off)", "404", c.post(f"/v2/repository/models/{model}/unload", b""))
    c.expect("still serving after the unloads", "200", c.post("/generate", SIMPLE))


def _headers(c: _Classes) -> None:
    for label, headers in (
        ("100 KB header", b"X-Big: " + b"a" * 100_000 + b"\r\n"),
        ("8 MB header", b"X-Big: " + b"a" * 8_000_000 + b"\r\n"),
        ("10,000 headers", b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))),
    ):
        request = b"GET /v2/health/live HTTP/1.1\r\nHost: ferry\r\n" + headers + b"\r\n"
        c.expect(label, "431", raw_exchange(c.server.port, request)[0])


def _chunked_bodies(c: _Classes, max_body_bytes: int) -> None:
    """A chunked body twice the limit on every route that takes a body."""
    model = c.model
    for path in ("/generate", f"/v1/models/{model}:predict", f"/v2/models/{model}/infer", "/openai/v1/completions"):
        status, _, _ = raw_exchange(c.server.port, _chunked(path, max_body_bytes * 2, c.key))
        c.expect(f"chunked body over the limit: {path}", "413", status)


def _big_prompts(c: _Classes) -> float:
    """1 MB of prompt text, refused while a liveness probe polls: the probe's slowest, in ms."""
    probe: list[tuple[int, float]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            probe.append(timed_get(c.server.url + "/v2/health/live"))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    c.expect("1 MB prompt", "400", c.post("/generate", json.dumps({"text": "b" * 1_000_000}).encode()))
    words = json.dumps({"instances": [("lorem ipsum dolor sit amet " * 2500)[:66_000]] * 15}).encode()
    c.expect("1 MB of prompts under the character bound", "400", c.post(f"/v1/models/{c.model}:predict", words))
    done.set()
    poller.join(10)
    return 1000 * max((elapsed for _, elapsed in probe), default=float("nan"))


def _v2_bodies(c: _Classes) -> None:
    """A lone surrogate, and the binary-data extension's header and sizes that do not fit."""
    infer = f"/v2/models/{c.model}/infer"
    surrogate = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a\\ud800"]}]}'
    c.expect("V2 lone surrogate", "400", c.post(infer, surrogate))
    header = json.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}
    ).encode()
    raw = (5).to_bytes(4, "little") + b"hello"
    for label, value, body in (
        ("V2 binary: bad header value", "abc", header + raw),
        ("V2 binary: header longer than the body", str(len(header) + 99), header + raw),
        ("V2 binary: no inputs", "11", b'{"id": "x"}' + raw),
        ("V2 binary: sizes do not add up", str(len(header)), header + raw[:5]),
    ):
        extra = {"inference-header-content-length": value, "Content-Type": "application/octet-stream"}
        c.expect(label, "400", c.post(infer, body, extra))


def _sampling_extremes(c: _Classes) -> None:
    for label, extra_fields in (("OpenAI top_k huge", {"top_k": 10**12}), ("OpenAI top_p tiny", {"top_p": 1e-320})):
        body = json.dumps({"model": c.model, "prompt": "hi", "max_tokens": 2, **extra_fields}).encode()
        c.expect(label, "200 or 400", c.post("/openai/v1/completions", body))


def _log_injection(c: _Classes) -> int:
    """A newline in a model name and a 900 KB field name: the bytes of the latter's answer."""
    forged = "FORGED ferry.server ERROR forged line"
    status = http_call(f"{c.server.url}/v2/models/x%0a{forged.replace(' ', '%20')}/ready", None, c.auth)[0]
    c.expect("model name with %0a", "404", status)
    big_field = json.dumps({"text": "hi", "k" * 900_000: 1}).encode()
    status, answer = http_call(c.server.url + "/generate", big_field, c.auth)
    c.expect("900 KB field name", "400", status)
    return len(answer)


def _grpc_classes(c: _Classes, grpc_target: str) -> float:
    """No key, the unload route, parameters of the wrong kind and a 7 MB prompt: the seconds
    the 7 MB prompt took to be refused."""
    metadata = (("authorization", f"Bearer {c.key}"),)
    with grpc.insecure_channel(grpc_target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        no_key = _grpc(lambda: stub.ModelInfer(_grpc_text(c.model, b"hi"), timeout=10))
        c.expect("gRPC no key", "UNAUTHENTICATED", no_key)
        unload = pb.RepositoryModelUnloadRequest(model_name=c.model)
        c.expect("gRPC unload with the key", "UNIMPLEMENTED",
                 _grpc(lambda: stub.RepositoryModelUnload(unload, metadata=metadata, timeout=10)))  # fmt: skip
        for label, parameter in (
            ("gRPC string_param", pb.InferParameter(string_param="5")),
            ("gRPC bool_param", pb.InferParameter(bool_param=True)),
        ):
            request = _grpc_text(c.model, b"hi", max_new_tokens=parameter)
            code = _grpc(lambda r=request: stub.ModelInfer(r, metadata=metadata, timeout=10))  # type: ignore[misc]
            c.expect(label, "INVALID_ARGUMENT", code)
        started = time.monotonic()
        code = _grpc(lambda: stub.ModelInfer(_grpc_text(c.model, b"c" * 7_000_000), metadata=metadata, timeout=10))
        c.expect("gRPC 7 MB prompt", "RESOURCE_EXHAUSTED", code)
        return time.monotonic() - started


def input_classes(
    server: Server, *, key: str, model: str, grpc_target: str, max_body_bytes: int
) -> dict[str, Any]:
    """One request per input class (issue 12's list); each answer must be the expected 4xx (or
    gRPC status), never a 5xx, INTERNAL or UNKNOWN."""
    c = _Classes(server, key, model)
    _credentials(c)
    _headers(c)
    _chunked_bodies(c, max_body_bytes)
    probe_max_ms = _big_prompts(c)
    _v2_bodies(c)
    _sampling_extremes(c)
    field_answer_bytes = _log_injection(c)
    grpc_7mb_s = _grpc_classes(c, grpc_target)
    log_text = server.log_path.read_text(errors="replace")
    failures = [r for r in c.results if r[2] not in r[1].split(" or ")]
    server_errors = [r for r in c.results if r[2].startswith("5") or r[2] in ("INTERNAL", "UNKNOWN")]
    return {
        "classes": len(c.results),
        "results": [f"{name}: {got} (expected {expected})" for name, expected, got in c.results],
        "unexpected": [f"{name}: {got} (expected {expected})" for name, expected, got in failures],
        "server_errors": len(server_errors),
        "probe_max_ms_during_1mb_prompts": probe_max_ms,
        "grpc_7mb_refused_s": round(grpc_7mb_s, 3),
        "900kb_field_answer_bytes": field_answer_bytes,
        "traceback_in_log": "Traceback" in log_text,
        "forged_line_in_log": any(line.startswith("FORGED") for line in log_text.splitlines()),
    }
