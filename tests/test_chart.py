"""helm/ferry: lint, render every ci/*-values.yaml scenario, validate every object strictly."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import chart
from deploy import k8s_validate as kv
from predictor.settings import Settings

SCENARIOS = chart.scenarios()
VALUES = yaml.safe_load((chart.CHART / "values.yaml").read_text())
SCHEMA = json.loads((chart.CHART / "values.schema.json").read_text())


def objects_of(scenario: str, **overrides: Any) -> list[dict[str, Any]]:
    values = chart.load_values(SCENARIOS[scenario]) if scenario else {}
    values.update(overrides)
    return chart.render_objects(values, name=f"ferry-{scenario or 'default'}")


def isvc_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (isvc,) = chart.find(objects, "InferenceService")
    return isvc


def container_of(isvc: dict[str, Any]) -> dict[str, Any]:
    (container,) = isvc["spec"]["predictor"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_the_four_scenarios_exist() -> None:
    assert set(SCENARIOS) == {"gpu-knative", "gpu-keda", "cpu", "minimal"}


def test_chart_metadata() -> None:
    meta = yaml.safe_load((chart.CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"] == ">=1.29.0-0"


@pytest.mark.parametrize("scenario", ["", *SCENARIOS])
def test_lint_is_clean_in_strict_mode(scenario: str) -> None:
    values = chart.load_values(SCENARIOS[scenario]) if scenario else None
    report = chart.lint(values)
    assert report["errors"] == []
    # severity 1 is INFO ("icon is recommended"); 2 = warning, 3 = error
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("scenario", ["", *SCENARIOS])
def test_every_rendered_object_is_strictly_valid(scenario: str) -> None:
    objects = objects_of(scenario)
    assert objects
    problems = {kv.label(o): kv.validate_document(o, chart.KUBE_VERSION) for o in objects}
    assert {k: v for k, v in problems.items() if v} == {}


def test_scenarios_render_what_they_enable() -> None:
    kinds = {s: sorted(o["kind"] for o in objects_of(s)) for s in SCENARIOS}
    assert kinds["minimal"] == ["InferenceService", "Pod", "PodDisruptionBudget"]
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy", "Service"} <= set(
        kinds["gpu-knative"]
    )
    assert {"Job", "ServiceMonitor", "PrometheusRule"} <= set(kinds["gpu-keda"])
    assert "Job" not in kinds["gpu-knative"] and "Job" not in kinds["cpu"]  # locust is opt-in


@pytest.mark.parametrize("scenario", ["gpu-knative", "gpu-keda"])
def test_gpu_scheduling(scenario: str) -> None:
    predictor = isvc_of(objects_of(scenario))["spec"]["predictor"]
    container = container_of({"spec": {"predictor": predictor}})
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in predictor[
        "tolerations"
    ]
    assert predictor["runtimeClassName"] == "nvidia"
    assert env_of(container)["FERRY_DEVICE"] == "cuda"
    assert container["image"].endswith("-cuda")


def test_cpu_scenario_has_no_gpu_anything() -> None:
    predictor = isvc_of(objects_of("cpu"))["spec"]["predictor"]
    container = container_of({"spec": {"predictor": predictor}})
    text = json.dumps(predictor)
    assert "nvidia" not in text and "runtimeClassName" not in predictor
    assert env_of(container)["FERRY_DEVICE"] == "cpu"
    assert not container["image"].endswith("-cuda")


@pytest.mark.parametrize(("batch", "target", "limit"), [(50, 40, 100), (20, 16, 40), (1, 1, 2)])
def test_knative_kpa_numbers_derive_from_max_batch_size(
    batch: int, target: int, limit: int
) -> None:
    isvc = isvc_of(objects_of("gpu-knative", ferry={"maxBatchSize": batch}))
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert (
        isvc["metadata"]["annotations"]["autoscaling.knative.dev/class"]
        == "kpa.autoscaling.knative.dev"
    )
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", target)
    assert predictor["containerConcurrency"] == limit
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 4)
    assert env_of(container_of(isvc))["FERRY_MAX_BATCH_SIZE"] == str(batch)
    # Knative allows one container port
    assert [p["containerPort"] for p in container_of(isvc)["ports"]] == [8080]


def test_keda_scales_on_ferrys_own_metric_from_prometheus() -> None:
    isvc = isvc_of(objects_of("gpu-keda"))
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
    (metric,) = isvc["spec"]["predictor"]["autoScaling"]["metrics"]
    assert metric["type"] == "External"
    external = metric["external"]
    assert external["metric"]["backend"] == "prometheus"
    assert external["metric"]["query"] == (
        'sum(ferry_requests_in_flight{namespace="ferry",pod=~"ferry-gpu-keda-predictor-.*"})'
    )
    assert external["target"] == {"type": "AverageValue", "averageValue": "40"}
    queue = isvc_of(
        objects_of(
            "gpu-keda",
            autoscaling={
                "keda": {"metric": "ferry_queue_depth", "serverAddress": "http://prom:9090"},
                "minReplicas": 1,
                "maxReplicas": 4,
            },
        )
    )
    assert (
        "ferry_queue_depth{"
        in queue["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["query"]
    )


def test_hpa_on_cpu_for_the_cpu_scenario() -> None:
    isvc = isvc_of(objects_of("cpu"))
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert (isvc["spec"]["predictor"]["scaleMetric"], isvc["spec"]["predictor"]["scaleTarget"]) == (
        "cpu",
        70,
    )


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_security_probes_and_kserve_conventions(scenario: str) -> None:
    isvc = isvc_of(objects_of(scenario))
    container = container_of(isvc)
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert container["name"] == "kserve-container"
    assert container["command"] == ["python", "-m", "predictor"]
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/v2/models/opt-125m/ready",
        "port": 8080,
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    env = env_of(container)
    assert env["FERRY_MODEL_DIR"] == "/mnt/models" and env["STORAGE_URI"]
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert annotations["prometheus.kserve.io/port"] == "8080"
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    grace = isvc["spec"]["predictor"].get("terminationGracePeriodSeconds")
    if grace is not None:
        assert float(env["FERRY_DRAIN_GRACE_S"]) < grace


def test_every_ferry_env_var_is_a_real_setting() -> None:
    for scenario in SCENARIOS:
        env = env_of(container_of(isvc_of(objects_of(scenario))))
        names = {k.removeprefix("FERRY_").lower() for k in env if k.startswith("FERRY_")}
        assert names <= set(Settings.model_fields), names - set(Settings.model_fields)
        assert {"max_batch_size", "max_batch_wait_s", "max_queue_size", "drain_grace_s"} <= names


def test_drain_grace_must_stay_below_the_pod_grace() -> None:
    with pytest.raises(Exception, match="drainGraceS must stay below"):
        objects_of("gpu-keda", terminationGracePeriodSeconds=20)


@pytest.mark.parametrize(
    "values",
    [
        {"autoscaling": {"minReplica": 1}},
        {"ferry": {"maxBatchSise": 10}},
        {"gpu": {"enabeld": False}},
        {"deploymentMode": "Serverless"},
        {"model": {"name": "opt-125m", "storageUri": ""}},
        {"metrics": {"serviceMonitor": {"enabled": True, "interval": "soon"}}},
    ],
)
def test_values_schema_rejects_typos_and_bad_values(values: dict[str, Any]) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmValuesError):
        chart.render(values)


def _schema_node(path: list[str]) -> dict[str, Any] | None:
    node: dict[str, Any] | None = SCHEMA
    for key in path:
        if node is None or "properties" not in node:
            return None
        node = node["properties"].get(key)
    return node


def test_every_value_is_documented() -> None:
    lines = (chart.CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented = []
    documented: set[str] = set()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(- )?([A-Za-z_][\w./-]*):", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if m.group(2):  # a list item: data inside a documented list
            continue
        path = [k for _, k in stack] + [m.group(3)]
        stack.append((indent, m.group(3)))
        parent = _schema_node(path[:-1])
        if parent is None or "properties" not in parent:
            continue  # inside a free-form Kubernetes object (resources, securityContext, ...)
        node = parent["properties"].get(m.group(3))
        assert node is not None, (
            f"values.yaml:{i + 1}: {'.'.join(path)} is not in values.schema.json"
        )
        j = i - 1
        while (
            j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --")
        ):
            j -= 1
        if j >= 0 and lines[j].strip().startswith("# --"):
            documented.add(".".join(path))
            continue
        if any(".".join(path[:n]) in documented for n in range(1, len(path))):
            continue  # inside an object documented as a whole (resources: requests/limits)
        if "properties" in node and node.get("type") == "object":
            continue  # a section; its keys carry the comments
        undocumented.append(".".join(path))
    assert undocumented == []


def test_dashboard_configmap_carries_the_dashboard_files() -> None:
    (cm,) = [o for o in objects_of("gpu-knative") if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = sorted((chart.CHART / "dashboards").glob("*.json"))
    assert files and sorted(cm["data"]) == [f.name for f in files]
    for f in files:
        assert json.loads(cm["data"][f.name]) == json.loads(f.read_text())


def test_prometheusrule_carries_the_rules_file() -> None:
    (rule,) = chart.find(objects_of("gpu-knative"), "PrometheusRule")
    rules = yaml.safe_load((chart.CHART / "rules" / "ferry-alerts.yaml").read_text())
    assert rule["spec"]["groups"] == rules["groups"]


def test_templates_accept_whatever_valid_dashboards_and_rules_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "ferry"
    shutil.copytree(chart.CHART, copy)
    for old in (copy / "dashboards").glob("*.json"):
        old.unlink()
    (copy / "dashboards" / "a.json").write_text(
        '{"title": "A", "panels": [{"expr": "up{a=\\"b\\"}"}]}'
    )
    (copy / "dashboards" / "b.json").write_text('{"title": "B with | and: colons"}')
    (copy / "rules" / "ferry-alerts.yaml").write_text(
        "# comment first\ngroups:\n- name: one\n  rules:\n  - alert: X\n    expr: up == 0\n"
        "    annotations: {summary: '{{ $labels.pod }} is down'}\n"
        "- name: two\n  rules:\n  - record: job:up:sum\n    expr: sum(up)\n"
    )
    monkeypatch.setattr(chart, "CHART", copy)
    objects = chart.render_objects(
        {"metrics": {"prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}}
    )
    (cm,) = chart.find(objects, "ConfigMap")
    assert json.loads(cm["data"]["b.json"]) == {"title": "B with | and: colons"}
    (rule,) = chart.find(objects, "PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == ["one", "two"]
    assert (
        rule["spec"]["groups"][0]["rules"][0]["annotations"]["summary"]
        == "{{ $labels.pod }} is down"
    )
    problems = {kv.label(o): kv.validate_document(o) for o in objects}
    assert {k: v for k, v in problems.items() if v} == {}, problems


def test_pdb_and_networkpolicy_select_the_predictor_pods() -> None:
    objects = objects_of("gpu-knative")
    want = {"serving.kserve.io/inferenceservice": "ferry-gpu-knative", "component": "predictor"}
    (pdb,) = chart.find(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == want
    (netpol,) = chart.find(objects, "NetworkPolicy")
    assert netpol["spec"]["podSelector"]["matchLabels"] == want
    (svc,) = chart.find(objects, "Service")
    assert svc["spec"]["selector"] == want


def test_helm_test_pod_calls_v2_readiness_and_one_inference() -> None:
    (pod,) = chart.find(objects_of("minimal"), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "/v2/models/$MODEL/ready" in script and "/v2/models/$MODEL/infer" in script
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env == {
        "URL": "http://ferry-minimal-predictor.ferry.svc.cluster.local",
        "MODEL": "opt-125m",
    }


def test_locust_job_is_bounded_headless_and_writes_csv() -> None:
    objects = objects_of("gpu-keda")
    (job,) = chart.find(objects, "Job")
    (cm,) = [o for o in chart.find(objects, "ConfigMap") if "locustfile.py" in o["data"]]
    source = cm["data"]["locustfile.py"]
    compile(source, "locustfile.py", "exec")
    assert "FastHttpUser" in source and '"/generate"' in source
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("locustio/locust:")
    command = container["args"][0]
    for flag in (
        "--headless",
        "--run-time 60s",
        "--users 40",
        "--csv /results/ferry",
        "cat /results/",
    ):
        assert flag in command
    assert job["spec"]["activeDeadlineSeconds"] > 60 and job["spec"]["backoffLimit"] == 0


def test_notes_render() -> None:
    notes = chart.render(chart.load_values(SCENARIOS["gpu-keda"]), name="ferry-gpu-keda")[
        "ferry/templates/NOTES.txt"
    ]
    assert "inferenceservice/ferry-gpu-keda" in notes and "helm test ferry-gpu-keda" in notes
