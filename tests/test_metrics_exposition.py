"""ferry's /metrics as Prometheus reads it: every ferry_* metric present, described, in base
units, counters ending in _total, closed label sets; KServe's own histograms kept; and
`promtool check metrics` has nothing to say."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from predictor import metrics
from tests.helpers import serving
from tests.promstack import FERRY_SETTINGS, in_ci, missing_binaries

# family name (as the parser reports it, _total stripped) -> type
EXPECTED = {
    "ferry_requests": "counter",
    "ferry_requests_rejected": "counter",
    "ferry_requests_timed_out": "counter",
    "ferry_requests_cancelled": "counter",
    "ferry_engine_failures": "counter",
    "ferry_queue_depth": "gauge",
    "ferry_queue_capacity": "gauge",
    "ferry_requests_in_flight": "gauge",
    "ferry_engine_slots_busy": "gauge",
    "ferry_engine_slots": "gauge",
    "ferry_queue_wait_seconds": "histogram",
    "ferry_batch_duration_seconds": "histogram",
    "ferry_request_duration_seconds": "histogram",
    "ferry_time_to_first_token_seconds": "histogram",
    "ferry_prompt_tokens": "counter",
    "ferry_generated_tokens": "counter",
    "ferry_batch_generated_tokens": "histogram",
    "ferry_batch_size": "histogram",
    "ferry_model_info": "gauge",  # an Info: one series, value 1, the facts in its labels
    # per request, labelled by model_name
    "ferry_request_prompt_tokens": "histogram",
    "ferry_request_generation_tokens": "histogram",
    "ferry_time_per_output_token_seconds": "histogram",
    "ferry_inter_token_latency_seconds": "histogram",
    "ferry_requests_finished": "counter",
}
CLOSED_LABELS = {
    "protocol": set(metrics.PROTOCOLS),
    "outcome": set(metrics.OUTCOMES),
    "reason": set(metrics.REJECT_REASONS),
    "stage": set(metrics.STAGES),
    "finish_reason": set(metrics.FINISH_REASONS),
}
PER_REQUEST = (
    "ferry_request_prompt_tokens",
    "ferry_request_generation_tokens",
    "ferry_time_per_output_token_seconds",
    "ferry_inter_token_latency_seconds",
    "ferry_requests_finished",
)


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("metrics"), **FERRY_SETTINGS) as ferry:
        for _ in range(3):
            body = {"text": "hello there", "max_new_tokens": 4}
            r = httpx.post(f"{ferry.url}/generate", json=body)
            assert r.status_code == 200
        r = httpx.post(f"{ferry.url}/v1/models/opt-125m:predict", json={"instances": ["hi"]})
        assert r.status_code == 200
        yield httpx.get(f"{ferry.url}/metrics").text


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_ferry_metric_is_exported_and_described(exposition: str) -> None:
    families = {n: f for n, f in _families(exposition).items() if n.startswith("ferry_")}
    assert {n: f.type for n, f in families.items()} == EXPECTED
    for name, family in families.items():
        assert len(family.documentation) > 15, f"{name}: help string too short"


def test_counters_end_in_total_and_no_created_series(exposition: str) -> None:
    for family in text_string_to_metric_families(exposition):
        if family.name.startswith("ferry_") and family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
    assert "_created" not in exposition


def test_time_is_in_seconds() -> None:
    for name, kind in EXPECTED.items():
        if kind == "histogram" and ("duration" in name or "wait" in name or "time" in name):
            assert name.endswith("_seconds"), name


def test_label_values_are_closed(exposition: str) -> None:
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        if not family.name.startswith("ferry_"):
            continue
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label in CLOSED_LABELS:
                    assert value in CLOSED_LABELS[label], f"{sample.name}{{{label}={value!r}}}"
                    seen.setdefault(label, set()).add(value)
    # Zero-initialised: every closed value exists before it first happens.
    assert seen == CLOSED_LABELS


def test_values_after_a_few_requests(exposition: str) -> None:
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(exposition)
        for s in f.samples
    }
    assert values[("ferry_requests_total", (("outcome", "ok"), ("protocol", "generate")))] == 3
    assert values[("ferry_requests_total", (("outcome", "ok"), ("protocol", "v1")))] == 1
    v1_tokens = FERRY_SETTINGS["default_max_new_tokens"]
    assert values[("ferry_generated_tokens_total", ())] == 3 * 4 + v1_tokens
    assert values[("ferry_batch_size_count", ())] >= 1
    assert values[("ferry_engine_slots", ())] == 1
    assert values[("ferry_queue_capacity", ())] == FERRY_SETTINGS["max_queue_size"]
    # Integer batch-size buckets up to max_batch_size.
    edges = sorted(
        float(s.labels["le"]) for f in text_string_to_metric_families(exposition)
        if f.name == "ferry_batch_size" for s in f.samples if s.name == "ferry_batch_size_bucket"
        and s.labels["le"] != "+Inf"
    )
    assert edges[-1] == FERRY_SETTINGS["max_batch_size"] and all(e == int(e) for e in edges)
    info = _families(exposition)["ferry_model_info"]
    assert [s.value for s in info.samples] == [1.0]
    assert info.samples[0].labels == {
        "name": "opt-125m", "kind": "simulated", "device": "simulated", "compute_type": "none",
        "slots": "1", "threads_per_slot": "0", "lone_batch_threads": "0", "background_slots": "0",
    }


def test_per_request_series_carry_model_name(exposition: str) -> None:
    families = _families(exposition)
    for name in PER_REQUEST:
        samples = families[name].samples
        assert samples, name
        assert {s.labels.get("model_name") for s in samples} == {"opt-125m"}, name
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for name in PER_REQUEST
        for s in families[name].samples
    }
    model = (("model_name", "opt-125m"),)
    # 3 x /generate (4 tokens each) + 1 x V1 (the default count), all ended by their length.
    assert values[("ferry_requests_finished_total", (("finish_reason", "length"), *model))] == 4
    assert values[("ferry_requests_finished_total", (("finish_reason", "eos"), *model))] == 0
    assert values[("ferry_request_generation_tokens_count", model)] == 4
    assert values[("ferry_request_generation_tokens_sum", model)] == 3 * 4 + FERRY_SETTINGS["default_max_new_tokens"]
    assert values[("ferry_request_prompt_tokens_count", model)] == 4
    assert values[("ferry_time_per_output_token_seconds_count", model)] == 4


def test_kserve_histograms_are_kept(exposition: str) -> None:
    families = _families(exposition)
    for step in ("preprocess", "predict", "postprocess"):
        name = f"request_{step}_seconds"
        assert families[name].type == "histogram"


def test_promtool_check_metrics_is_clean(exposition: str) -> None:
    if missing_binaries():
        if in_ci():
            pytest.fail("promtool missing: `make system-deps`")
        pytest.skip("promtool missing: `make system-deps`")
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


