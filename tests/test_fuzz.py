"""Property-based fuzzing of every HTTP route with generated good and bad bodies: no client input
may produce a 5xx, and every 4xx names what was wrong. Over 1,000 requests per run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import FerryProcess
from tests.helpers import INSTANT_ENGINE, serving

EXAMPLES = 300  # per route: 4 routes -> 1,200 requests

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
prompts = st.text(max_size=60) | st.sampled_from(["Hello World, what is your name dog?", "", " ", "\x00", "é" * 30])
token_counts = st.integers(-5, 300) | st.sampled_from([1, 10, 64, 65]) | json_scalars
# Valid deadlines are long enough never to pass here: a deadline the client chose passing is a
# 504 by design (tests/test_reliability.py covers it); the fuzz is about input validation.
timeouts = st.none() | st.floats(-1, 0) | st.floats(5, 200) | st.sampled_from([0, -0.001, 5, 121, 1e9, "x"])


def maybe(key: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(st.just({}), values.map(lambda v: {key: v}))


def merged(*parts: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(*parts).map(lambda ds: {k: v for d in ds for k, v in d.items()})


generate_bodies = merged(
    maybe("text", prompts | json_values),
    maybe("max_new_tokens", token_counts),
    maybe("timeout_s", timeouts),
    maybe("junk", json_values),
) | json_values

v1_instances = (
    prompts | merged(maybe("text", prompts | json_scalars), maybe("max_new_tokens", token_counts)) | json_values
)
v1_bodies = merged(
    maybe("instances", st.lists(v1_instances, max_size=70) | json_values),
    maybe("parameters", merged(maybe("max_new_tokens", token_counts), maybe("timeout_s", timeouts)) | json_values),
) | json_values

v2_datatypes = st.sampled_from(["BYTES", "INT32", "INT64", "FP32", "BOOL", "UINT8", "FP16", "STRING", ""])
v2_tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["text", "max_new_tokens", "prompt"]),
        "datatype": v2_datatypes,
        "shape": st.lists(st.integers(-2, 70), max_size=3),
        "data": st.lists(prompts | token_counts, max_size=6) | json_values,
    }
)
v2_bodies = merged(
    maybe("inputs", st.lists(v2_tensors, max_size=3) | json_values),
    maybe("parameters", merged(maybe("max_new_tokens", token_counts), maybe("timeout_s", timeouts))),
    maybe("id", json_scalars),
) | json_values

raw_bodies = st.binary(max_size=300) | st.sampled_from([b"", b"{", b'{"text": "\xff\xfe"}', b"[" * 200 + b"]" * 200])


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerryProcess]:
    with serving(tmp_path_factory.mktemp("fuzz"), **INSTANT_ENGINE, max_new_tokens_limit=64) as server:
        yield server


@pytest.fixture(scope="module")
def client(fuzz_server: FerryProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as c:
        yield c


def check(response: httpx.Response, counter: list[int]) -> None:
    counter.append(response.status_code)
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()
        message = body.get("error") or body.get("detail")
        assert message, f"a {response.status_code} must say what was wrong: {body}"


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def dumps(body: Any) -> bytes:
    try:
        return orjson.dumps(body)
    except (TypeError, orjson.JSONEncodeError):  # ints beyond 64 bits: send them as text JSON
        import json

        return json.dumps(body).encode()


def run_route(client: httpx.Client, path: str, bodies: st.SearchStrategy[Any], valid: Any = None) -> list[int]:
    """Posts the strategy's bodies (and `valid`, always: random ones are seldom all valid)."""
    statuses: list[int] = []

    @FUZZ
    @given(body=bodies)
    def one(body: Any) -> None:
        content = body if isinstance(body, bytes) else dumps(body)
        check(client.post(path, content=content, headers={"content-type": "application/json"}), statuses)

    if valid is not None:
        one = example(body=valid)(one)
    one()
    assert len(statuses) >= EXAMPLES * 0.9
    return statuses


def test_generate_never_500s(client: httpx.Client) -> None:
    statuses = run_route(client, "/generate", generate_bodies, {"text": "hi", "max_new_tokens": 2})
    assert 200 in statuses and 400 in statuses  # both good and bad requests were generated


def test_v1_never_500s(client: httpx.Client, fuzz_server: FerryProcess) -> None:
    valid = {"instances": [{"text": "hi", "max_new_tokens": 2}]}
    statuses = run_route(client, f"/v1/models/{fuzz_server.model_name}:predict", v1_bodies, valid)
    assert 200 in statuses and 400 in statuses


def test_v2_never_500s(client: httpx.Client, fuzz_server: FerryProcess) -> None:
    statuses = run_route(client, f"/v2/models/{fuzz_server.model_name}/infer", v2_bodies)
    assert set(statuses) & {400, 422}


def test_raw_bytes_never_500(client: httpx.Client, fuzz_server: FerryProcess) -> None:
    for path in ("/generate", f"/v1/models/{fuzz_server.model_name}:predict"):
        run_route(client, path, raw_bodies)
