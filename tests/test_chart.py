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


def runtime_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (runtime,) = [o for o in objects if o["kind"] in ("ClusterServingRuntime", "ServingRuntime")]
    return runtime


def ferry_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """ferry's container: the InferenceService's own, or the serving runtime's."""
    isvc = isvc_of(objects)
    if "model" in isvc["spec"]["predictor"]:
        (container,) = runtime_of(objects)["spec"]["containers"]
        return container
    return container_of(isvc)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_the_five_scenarios_exist() -> None:
    assert set(SCENARIOS) == {"gpu-knative", "gpu-keda", "cpu", "minimal", "runtime"}


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
    objects = objects_of(scenario)
    isvc = isvc_of(objects)
    container = ferry_container(objects)
    runtime = "model" in isvc["spec"]["predictor"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert container["name"] == "kserve-container"
    assert container["command"] == ["python", "-m", "predictor"]
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/v2/models/{{.Name}}/ready" if runtime else "/v2/models/opt-125m/ready",
        "port": 8080,
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    env = env_of(container)
    assert env["FERRY_MODEL_DIR"] == "/mnt/models"
    if runtime:
        assert isvc["spec"]["predictor"]["model"]["storageUri"] and "STORAGE_URI" not in env
    else:
        assert env["STORAGE_URI"]
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
        env = env_of(ferry_container(objects_of(scenario)))
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


# --------------------------------------------------------------------------- platform conventions


def _predictor(**values: Any) -> dict[str, Any]:
    return isvc_of(objects_of("", **values))["spec"]["predictor"]


def test_pods_never_get_an_api_token_and_run_non_root_with_seccomp() -> None:
    for scenario in SCENARIOS:
        objects = objects_of(scenario)
        predictor = isvc_of(objects)["spec"]["predictor"]
        assert predictor["automountServiceAccountToken"] is False
        assert predictor["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        knative = isvc_of(objects)["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
        # Knative rejects pod-level runAsNonRoot unless its podspec-securitycontext feature is on;
        # the container's securityContext carries it in every mode.
        assert ("runAsNonRoot" in predictor["securityContext"]) is not knative
        assert ferry_container(objects)["securityContext"]["runAsNonRoot"] is True
    full = _predictor(knative={"podSpecSecurityContext": True})
    assert full["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert _predictor(serviceAccount={"create": False, "name": "", "annotations": {}, "automount": True})[
        "automountServiceAccountToken"
    ] is True


def test_service_account_create_name_annotations_automount() -> None:
    sa_values = {"create": True, "name": "", "annotations": {"eks.amazonaws.com/role-arn": "arn:x"}, "automount": False}
    objects = objects_of("", serviceAccount=sa_values)
    (sa,) = chart.find(objects, "ServiceAccount")
    assert sa["metadata"]["name"] == "ferry-default"
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:x"}
    assert sa["automountServiceAccountToken"] is False
    assert isvc_of(objects)["spec"]["predictor"]["serviceAccountName"] == "ferry-default"
    named = objects_of("", serviceAccount={**sa_values, "name": "models-reader"})
    assert chart.find(named, "ServiceAccount")[0]["metadata"]["name"] == "models-reader"
    existing = objects_of("", serviceAccount={**sa_values, "create": False, "name": "models-reader"})
    assert chart.find(existing, "ServiceAccount") == []
    assert isvc_of(existing)["spec"]["predictor"]["serviceAccountName"] == "models-reader"
    assert "serviceAccountName" not in _predictor()


def test_pod_annotations_labels_priority_class() -> None:
    predictor = _predictor(
        podAnnotations={"sidecar.istio.io/inject": "true"}, podLabels={"team": "ml"}, priorityClassName="inference"
    )
    assert predictor["annotations"] == {"sidecar.istio.io/inject": "true"}
    assert predictor["labels"] == {"team": "ml"}
    assert predictor["priorityClassName"] == "inference"
    assert not {"annotations", "labels", "priorityClassName"} & set(_predictor())


def test_topology_spread_constraints_select_the_predictor_pods_by_default() -> None:
    spread = [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"},
        {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
         "labelSelector": {"matchLabels": {"app": "mine"}}},
    ]
    zone, host = _predictor(topologySpreadConstraints=spread)["topologySpreadConstraints"]
    assert zone["labelSelector"] == {
        "matchLabels": {"serving.kserve.io/inferenceservice": "ferry-default", "component": "predictor"}
    }
    assert zone["topologyKey"] == "topology.kubernetes.io/zone"
    assert host["labelSelector"] == {"matchLabels": {"app": "mine"}}
    assert "topologySpreadConstraints" not in _predictor()


def test_env_from_extra_env_extra_volumes_and_mounts() -> None:
    predictor = _predictor(
        envFrom=[{"secretRef": {"name": "ferry-env"}}],
        extraEnv=[{"name": "FERRY_ACCESS_LOG", "value": "true"}],
        extraVolumes=[{"name": "cache", "emptyDir": {}}],
        extraVolumeMounts=[{"name": "cache", "mountPath": "/cache"}],
    )
    (container,) = predictor["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "ferry-env"}}]
    assert container["env"][-1] == {"name": "FERRY_ACCESS_LOG", "value": "true"}
    assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "cache", "emptyDir": {}} in predictor["volumes"]
    assert "envFrom" not in container_of({"spec": {"predictor": _predictor()}})
    # the same values land in the serving runtime's container when the chart installs one
    objects = objects_of("runtime", envFrom=[{"configMapRef": {"name": "c"}}],
                         extraVolumes=[{"name": "cache", "emptyDir": {}}],
                         extraVolumeMounts=[{"name": "cache", "mountPath": "/cache"}])
    runtime = runtime_of(objects)
    assert runtime["spec"]["containers"][0]["envFrom"] == [{"configMapRef": {"name": "c"}}]
    assert {"name": "cache", "emptyDir": {}} in runtime["spec"]["volumes"]


def test_api_key_comes_from_an_existing_secret() -> None:
    key_env = {"name": "FERRY_API_KEY", "valueFrom": {"secretKeyRef": {"name": "ferry-api-key", "key": "token"}}}
    for scenario in ("", "runtime"):
        objects = objects_of(scenario, apiKey={"existingSecret": "ferry-api-key", "secretKey": "token"})
        assert key_env in ferry_container(objects)["env"], scenario
        assert all(e["name"] != "FERRY_API_KEY" for e in ferry_container(objects_of(scenario))["env"])
    # the clients the chart runs send it too
    objects = objects_of("gpu-keda", apiKey={"existingSecret": "ferry-api-key", "secretKey": "token"})
    (pod,) = chart.find(objects, "Pod")
    (job,) = chart.find(objects, "Job")
    for spec in (pod["spec"], job["spec"]["template"]["spec"]):
        assert key_env in spec["containers"][0]["env"]
    assert "Authorization: Bearer ${FERRY_API_KEY:-}" in pod["spec"]["containers"][0]["args"][0]


def test_image_digest_pins_the_image() -> None:
    digest = "sha256:" + "ab" * 32
    image = container_of(isvc_of(objects_of("gpu-knative", image={
        "repository": "r.example/ferry", "tag": "ignored", "pullPolicy": "IfNotPresent", "digest": digest
    })))["image"]
    assert image == f"r.example/ferry@{digest}"
    with pytest.raises(Exception, match="digest"):
        objects_of("", image={"repository": "r", "tag": "", "pullPolicy": "Always", "digest": "latest"})


def test_inferenceservice_annotations_labels_and_toggle() -> None:
    isvc = isvc_of(objects_of("", inferenceService={
        "enabled": True, "annotations": {"serving.kserve.io/enable-tag-routing": "true"}, "labels": {"cost": "ml"}
    }))
    assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-tag-routing"] == "true"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"  # kept
    assert isvc["metadata"]["labels"]["cost"] == "ml"
    assert isvc["metadata"]["labels"]["app.kubernetes.io/name"] == "ferry"
    only_runtime = objects_of("runtime", inferenceService={"enabled": False, "annotations": {}, "labels": {}})
    assert chart.find(only_runtime, "InferenceService") == []
    assert runtime_of(only_runtime)["kind"] == "ClusterServingRuntime"


def test_serving_runtime_and_an_inferenceservice_that_uses_it() -> None:
    objects = objects_of("runtime")
    runtime = runtime_of(objects)
    assert runtime["kind"] == "ClusterServingRuntime" and "namespace" not in runtime["metadata"]
    assert runtime["spec"]["supportedModelFormats"] == [
        {"name": "ctranslate2", "version": "4", "autoSelect": True, "priority": 1}
    ]
    (container,) = runtime["spec"]["containers"]
    assert container["args"] == ["--model_name={{.Name}}", "--http_port=8080", "--grpc_port=8081"]
    assert [p["containerPort"] for p in container["ports"]] == [8080, 8081]
    assert runtime["spec"]["protocolVersions"] == ["v1", "v2", "grpc-v2"]
    predictor = isvc_of(objects)["spec"]["predictor"]
    assert "containers" not in predictor and "volumes" not in predictor
    assert predictor["model"]["modelFormat"] == {"name": "ctranslate2"}
    assert predictor["model"]["runtime"] == "ferry"
    assert predictor["model"]["storageUri"] == VALUES["model"]["storageUri"]
    (test_pod,) = chart.find(objects, "Pod")
    assert {"name": "MODEL", "value": "ferry-runtime"} in test_pod["spec"]["containers"][0]["env"]
    # namespaced variant, Knative (one port), GPU: the GPU is asked for by the InferenceService
    rt_values = {**VALUES["servingRuntime"], "enabled": True, "kind": "ServingRuntime", "name": "ferry-ns"}
    objects = objects_of("gpu-knative", servingRuntime=rt_values)
    runtime = runtime_of(objects)
    assert runtime["kind"] == "ServingRuntime" and runtime["metadata"]["namespace"] == chart.NAMESPACE
    assert [p["containerPort"] for p in runtime["spec"]["containers"][0]["ports"]] == [8080]
    assert runtime["spec"]["containers"][0]["image"].endswith("-cuda")
    predictor = isvc_of(objects)["spec"]["predictor"]
    assert predictor["model"]["runtime"] == "ferry-ns"
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in json.dumps(runtime["spec"]["containers"][0]["resources"])
    problems = {kv.label(o): kv.validate_document(o, chart.KUBE_VERSION) for o in objects}
    assert {k: v for k, v in problems.items() if v} == {}


def _peers(netpol: dict[str, Any]) -> list[tuple[dict[str, Any], list[int]]]:
    return [(rule["from"][0], [p["port"] for p in rule["ports"]]) for rule in netpol["spec"]["ingress"]]


def test_networkpolicy_admits_only_what_the_chart_names() -> None:
    (standard,) = chart.find(objects_of("runtime"), "NetworkPolicy")
    peers = _peers(standard)
    gateway, prometheus, helm_test = peers
    assert gateway == (
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}},
         "podSelector": {"matchLabels": {"istio": "ingressgateway"}}},
        [8080, 8081],
    )
    assert prometheus == (
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},
        [8080],
    )
    assert helm_test[0] == {"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "ferry", "app.kubernetes.io/instance": "ferry-runtime",
        "app.kubernetes.io/component": "test"}}}
    # every peer names both a namespace and pods, or pods of the release's own namespace: no open rule
    for peer, _ in peers:
        assert peer.get("podSelector", {}).get("matchLabels")
    (knative,) = chart.find(objects_of("gpu-knative"), "NetworkPolicy")
    assert [ports for _, ports in _peers(knative)] == [[8012], [8012], [9090], [8080, 9091], [8012]]
    assert [p.get("podSelector") for p, _ in _peers(knative)][1:3] == [
        {"matchLabels": {"app": "activator"}}, {"matchLabels": {"app": "autoscaler"}}
    ]
    # the helm test pod carries the labels the policy admits
    (pod,) = chart.find(objects_of("runtime"), "Pod")
    assert helm_test[0]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # Helm merges maps with the defaults: null drops a default label
    custom = {"enabled": True, "ingressGateway": {"namespace": "gw", "podLabels": {"istio": None, "app": "gw"}},
              "knativeNamespace": "kn", "prometheus": {"namespace": "obs", "podLabels": {"app": "prom"}},
              "extraIngress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]}
    (netpol,) = chart.find(objects_of("runtime", networkPolicy=custom), "NetworkPolicy")
    assert netpol["spec"]["ingress"][-1] == {"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}
    assert netpol["spec"]["ingress"][0]["from"][0]["podSelector"] == {"matchLabels": {"app": "gw"}}
    assert chart.find(objects_of("minimal"), "NetworkPolicy") == []


@pytest.mark.parametrize(
    "values",
    [
        {"serviceAccount": {"create": "yes"}},
        {"serviceAccount": {"automount": True, "token": True}},
        {"servingRuntime": {"enabled": True, "kind": "Runtime", "name": "ferry", "modelFormatVersion": "4",
                            "autoSelect": True, "priority": 1}},
        {"podLabels": {"a": 1}},
        {"topologySpreadConstraints": [{"maxSkew": 1}]},
        {"extraVolumeMounts": [{"name": "x"}]},
        {"networkPolicy": {"allowedNamespaces": ["x"]}},
        {"serviceAccountName": "x"},
        {"apiKey": {"existingSecret": "Not_A_Name", "secretKey": "api-key"}},
        {"apiKey": {"existingSecret": "ok", "secretKey": "api-key", "value": "inline-key"}},
    ],
)
def test_schema_rejects_bad_new_values(values: dict[str, Any]) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmValuesError):
        chart.render(values)


# --------------------------------------------------------------------------- the chart README


def test_chart_readme_values_table_is_generated_from_values_yaml() -> None:
    text = chart.README.read_text()
    assert chart.readme_with_table(text) == text, "run `make chart-readme`"
    for key in ("podAnnotations", "podLabels", "priorityClassName", "topologySpreadConstraints",
                "serviceAccount.create", "serviceAccount.name", "serviceAccount.annotations",
                "serviceAccount.automount", "envFrom", "extraEnv", "extraVolumes", "extraVolumeMounts",
                "image.digest", "inferenceService.annotations", "inferenceService.labels",
                "servingRuntime.enabled", "networkPolicy.ingressGateway.namespace"):
        assert f"| `{key}` |" in text, key


def test_chart_readme_has_install_examples_and_upgrade_notes() -> None:
    text = chart.README.read_text()
    for heading in ("## Install", "### GPU example", "### CPU example", "## Values", "## Upgrading"):
        assert f"\n{heading}\n" in text, heading


@pytest.mark.parametrize("example", ["GPU example", "CPU example"])
def test_chart_readme_examples_render_strictly_valid_objects(example: str) -> None:
    section = chart.README.read_text().split(f"### {example}\n", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0].replace("sha256:0123...", "sha256:" + "0" * 64)
    values = yaml.safe_load(block)
    objects = chart.render_objects(values, name="ferry")
    problems = {kv.label(o): kv.validate_document(o, chart.KUBE_VERSION) for o in objects}
    assert {k: v for k, v in problems.items() if v} == {}
    env = env_of(container_of(isvc_of(objects)))
    assert env["FERRY_DEVICE"] == ("cuda" if example.startswith("GPU") else "cpu")


def test_runbook_urls_follow_the_runbook_base_url_value() -> None:
    def runbooks(values: dict[str, Any]) -> set[str]:
        (rule,) = chart.find(chart.render_objects(values), "PrometheusRule")
        return {r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}

    shipped = runbooks({"metrics": {"prometheusRule": {"enabled": True}}})
    default = "https://github.com/ferry-serving/ferry/blob/main/docs/runbooks.md#"
    assert shipped and all(u.startswith(default) for u in shipped)
    base = "https://wiki.example.internal/ferry/runbooks"
    moved = runbooks({"metrics": {"prometheusRule": {"enabled": True, "runbookBaseUrl": base}}})
    assert moved == {u.replace(u.split("#")[0], base) for u in shipped}
