"""manifests/: strictly valid, documented, and the same objects as the chart renders (no drift)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploy import chart
from deploy import k8s_validate as kv

MANIFESTS = sorted(chart.MANIFESTS.glob("*.yaml"))
# manifest -> (ci scenario, release name, extra values) the chart renders the same objects from
SAME_AS_CHART = {
    "inferenceservice-gpu-knative.yaml": ("gpu-knative", "ferry-gpu", {}),
    "inferenceservice-gpu-keda.yaml": ("gpu-keda", "ferry-gpu-keda", {}),
    "inferenceservice-cpu.yaml": ("cpu", "ferry-cpu", {}),
    "loadtest-job.yaml": ("gpu-knative", "ferry-gpu", {"loadtest": {"enabled": True}}),
}
HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version"}


def docs(path: Path) -> list[dict[str, Any]]:
    return list(kv.iter_documents(path.read_text()))


def test_every_manifest_is_compared_with_the_chart() -> None:
    assert {p.name for p in MANIFESTS} == set(SAME_AS_CHART)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_strictly_valid_and_says_when_to_use_it(path: Path) -> None:
    objects = docs(path)
    assert objects
    assert {kv.label(o): kv.validate_document(o, chart.KUBE_VERSION) for o in objects} == {
        kv.label(o): [] for o in objects
    }
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("# ") and "Use this when" in header


def _without_helm_labels(obj: dict[str, Any]) -> dict[str, Any]:
    def strip(meta: dict[str, Any]) -> None:
        labels = meta.get("labels") or {}
        for key in HELM_ONLY_LABELS:
            labels.pop(key, None)

    strip(obj["metadata"])
    template = obj.get("spec", {}).get("template", {})
    if "metadata" in template:
        strip(template["metadata"])
    return obj


@pytest.mark.parametrize("name", sorted(SAME_AS_CHART))
def test_manifest_and_chart_describe_the_same_objects(name: str) -> None:
    scenario, release, extra = SAME_AS_CHART[name]
    values = chart.load_values(chart.scenarios()[scenario])
    values.update(extra)
    rendered = {
        kv.label(o): _without_helm_labels(o)
        for o in chart.render_objects(values, name=release, namespace=chart.NAMESPACE)
    }
    for obj in docs(chart.MANIFESTS / name):
        key = kv.label(obj)
        assert key in rendered, f"{name}: the chart renders no {key}"
        assert obj == rendered[key], f"{name}: {key} differs from the chart's render"


def test_the_manifests_share_the_charts_defaults() -> None:
    """Model, storage, batching and drain defaults are the chart's values.yaml defaults."""
    values = chart.load_values(chart.CHART / "values.yaml")
    for path in MANIFESTS:
        for obj in docs(path):
            if obj["kind"] != "InferenceService":
                continue
            (container,) = obj["spec"]["predictor"]["containers"]
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env["STORAGE_URI"] == values["model"]["storageUri"]
            assert env["FERRY_MODEL_NAME"] == values["model"]["name"]
            assert int(env["FERRY_MAX_BATCH_SIZE"]) == values["ferry"]["maxBatchSize"]
            assert float(env["FERRY_DRAIN_GRACE_S"]) == values["ferry"]["drainGraceS"]
            assert int(env["FERRY_MAX_QUEUE_SIZE"]) == values["ferry"]["maxQueueSize"]
