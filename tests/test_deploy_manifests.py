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
    "clusterservingruntime.yaml": ("runtime", "ferry-runtime", {}),
    "servingruntime.yaml": (
        "runtime",
        "ferry-runtime",
        {"servingRuntime": {"enabled": True, "kind": "ServingRuntime", "name": "ferry",
                            "modelFormatVersion": "4", "autoSelect": True, "priority": 1}},
    ),
}
# The runtime's minimal example: modelFormat + storageUri only, nothing for the chart to render.
EXAMPLES = {"inferenceservice-runtime.yaml"}
HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version"}


def docs(path: Path) -> list[dict[str, Any]]:
    return list(kv.iter_documents(path.read_text()))


def test_every_manifest_is_compared_with_the_chart() -> None:
    assert {p.name for p in MANIFESTS} == set(SAME_AS_CHART) | EXAMPLES


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
            if obj["kind"] not in ("InferenceService", "ClusterServingRuntime", "ServingRuntime"):
                continue
            if path.name in EXAMPLES:
                assert obj["spec"]["predictor"]["model"]["storageUri"] == values["model"]["storageUri"]
                continue
            if obj["kind"] != "InferenceService":
                (container,) = obj["spec"]["containers"]
                env = {e["name"]: e["value"] for e in container["env"]}
                assert "STORAGE_URI" not in env and "FERRY_MODEL_NAME" not in env  # KServe provides both
                assert int(env["FERRY_MAX_BATCH_SIZE"]) == values["ferry"]["maxBatchSize"]
                continue
            (container,) = obj["spec"]["predictor"]["containers"]
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env["STORAGE_URI"] == values["model"]["storageUri"]
            assert env["FERRY_MODEL_NAME"] == values["model"]["name"]
            assert int(env["FERRY_MAX_BATCH_SIZE"]) == values["ferry"]["maxBatchSize"]
            assert float(env["FERRY_DRAIN_GRACE_S"]) == values["ferry"]["drainGraceS"]
            assert int(env["FERRY_MAX_QUEUE_SIZE"]) == values["ferry"]["maxQueueSize"]


def _runtimes() -> list[dict[str, Any]]:
    return [o for name in ("clusterservingruntime.yaml", "servingruntime.yaml") for o in docs(chart.MANIFESTS / name)]


def test_the_runtimes_serve_ctranslate2_with_ferrys_container() -> None:
    kinds = sorted(o["kind"] for o in _runtimes())
    assert kinds == ["ClusterServingRuntime", "ServingRuntime"]
    for runtime in _runtimes():
        spec = runtime["spec"]
        assert runtime["metadata"]["name"] == "ferry"
        assert spec["supportedModelFormats"] == [
            {"name": "ctranslate2", "version": "4", "autoSelect": True, "priority": 1}
        ]
        (container,) = spec["containers"]
        assert container["name"] == "kserve-container" and container["image"].startswith("ghcr.io/ferry-serving/ferry:")
        assert "--model_name={{.Name}}" in container["args"]
        assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("http1", 8080), ("grpc", 8081)]
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/models/{{.Name}}/ready", "port": 8080}
        assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert container["securityContext"]["runAsNonRoot"] is True
        assert {"name": "FERRY_DEVICE", "value": "auto"} in container["env"]
        assert sorted(spec["protocolVersions"]) == ["grpc-v2", "v1", "v2"]
    namespaced = [o for o in _runtimes() if o["kind"] == "ServingRuntime"]
    assert namespaced[0]["metadata"]["namespace"] == chart.NAMESPACE


def test_the_runtime_example_names_only_a_model_format_and_a_storage_uri() -> None:
    (isvc,) = docs(chart.MANIFESTS / "inferenceservice-runtime.yaml")
    predictor = isvc["spec"]["predictor"]
    assert list(predictor) == ["model"]
    assert set(predictor["model"]) == {"modelFormat", "storageUri"}
    assert predictor["model"]["modelFormat"] == {"name": "ctranslate2"}
    assert "containers" not in predictor
    # the runtime's two ports need Standard mode (Knative allows one)
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
