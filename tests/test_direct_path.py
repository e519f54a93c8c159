"""The hot routes' direct path (predictor/front/direct.py) answers as the ASGI path does.

A body with a Content-Length takes the direct path; the same body sent chunked takes the ASGI
path: both must give the same status, headers and body. Keep-alive, pipelining and
`Connection: close` are uvicorn's cycle's, which the direct path completes by hand."""

from __future__ import annotations

import socket

import httpx
import orjson

from tests.conftest import REFERENCE_PROMPT, FerryFactory, FerryProcess
from tests.helpers import INSTANT_ENGINE

BODY = orjson.dumps({"text": REFERENCE_PROMPT, "max_new_tokens": 4, "ignore_eos": True})


def exchange(port: int, data: bytes, answers: int) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Sends raw bytes on one connection; reads `answers` responses (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        buffer = b""
        responses = []
        while len(responses) < answers:
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(65536)
                assert chunk, f"connection closed after {len(responses)} answers: {buffer!r}"
                buffer += chunk
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            status, *lines = head.split(b"\r\n")
            headers = dict(line.lower().split(b": ", 1) for line in lines)
            length = int(headers[b"content-length"])
            while len(buffer) < length:
                buffer += sock.recv(65536)
            responses.append((status, headers, buffer[:length]))
            buffer = buffer[length:]
        return responses


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", *extra]
    return ("\r\n".join(head) + f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def post_chunked(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head.encode() + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


def comparable(headers: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {name: value for name, value in headers.items() if name not in (b"date", b"x-request-id")}


def test_direct_and_asgi_answers_are_the_same(ferry: FerryProcess) -> None:
    v1 = f"/v1/models/{ferry.model_name}:predict"
    cases = [
        ("/generate", BODY),
        ("/generate", b'{"text": ""}'),  # 400 naming the field
        ("/generate", b"{not json"),
        (v1, orjson.dumps({"instances": [{"text": REFERENCE_PROMPT, "max_new_tokens": 3}]})),
        (v1, b'{"instances": []}'),
    ]
    for path, body in cases:
        ((direct_status, direct_headers, direct_body),) = exchange(ferry.http_port, post(path, body), 1)
        ((asgi_status, asgi_headers, asgi_body),) = exchange(ferry.http_port, post_chunked(path, body), 1)
        assert direct_status == asgi_status, (path, body)
        assert comparable(direct_headers) == comparable(asgi_headers), (path, body)
        assert direct_body == asgi_body, (path, body)
        assert len(direct_headers[b"x-request-id"]) == 32
        assert b"date" in direct_headers


def test_pipelined_requests_are_answered_in_order_on_one_connection(ferry: FerryProcess) -> None:
    bodies = [orjson.dumps({"text": f"{REFERENCE_PROMPT} {i}", "max_new_tokens": 2 + i}) for i in range(3)]
    data = b"".join(post("/generate", body, f"X-Request-Id: pipelined-{i}") for i, body in enumerate(bodies))
    answers = exchange(ferry.http_port, data, 3)
    for i, (status, headers, body) in enumerate(answers):
        assert status == b"HTTP/1.1 200 OK"
        assert headers[b"x-request-id"] == f"pipelined-{i}".encode()
        assert orjson.loads(body)["generated_tokens"] <= 2 + i


def test_connection_close_is_honoured(ferry: FerryProcess) -> None:
    with socket.create_connection(("127.0.0.1", ferry.http_port), timeout=10) as sock:
        sock.sendall(post("/generate", BODY, "Connection: close"))
        received = b""
        while chunk := sock.recv(65536):  # the server closes: recv returns b""
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" in head.lower()
    assert orjson.loads(body)["generated_tokens"] == 4


def test_keep_alive_connection_serves_many_requests(ferry: FerryProcess) -> None:
    with httpx.Client(base_url=ferry.url, timeout=30) as client:
        for _ in range(5):
            answer = client.post("/generate", content=BODY, headers={"content-type": "application/json"})
            assert answer.status_code == 200
            assert answer.json()["generated_tokens"] == 4
        assert client.get("/v2/health/ready").status_code == 200  # the same connection, an ASGI route


def test_refused_without_the_api_key_the_same_on_both_paths(ferry_factory: FerryFactory) -> None:
    keyed = ferry_factory(api_key="test-key-0123456789abcdef", **INSTANT_ENGINE)
    ((direct_status, direct_headers, direct_body),) = exchange(keyed.http_port, post("/generate", BODY), 1)
    ((asgi_status, asgi_headers, asgi_body),) = exchange(keyed.http_port, post_chunked("/generate", BODY), 1)
    assert direct_status == asgi_status == b"HTTP/1.1 401 Unauthorized"
    assert comparable(direct_headers) == comparable(asgi_headers)
    assert direct_body == asgi_body
    with socket.create_connection(("127.0.0.1", keyed.http_port), timeout=10) as sock:  # one length header
        sock.sendall(post("/generate", BODY))
        assert sock.recv(65536).lower().count(b"content-length:") == 1
