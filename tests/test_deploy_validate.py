"""The strict offline validator (deploy/k8s_validate.py) and the schemas the project carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator

from deploy import k8s_validate as kv
from tests.conftest import ROOT

SCHEMAS = sorted((ROOT / "deploy" / "schemas").glob("*.json"))

ISVC = {
    "apiVersion": "serving.kserve.io/v1beta1",
    "kind": "InferenceService",
    "metadata": {"name": "ferry", "labels": {"app": "ferry"}},
    "spec": {
        "predictor": {
            "minReplicas": 1,
            "containers": [{"name": "kserve-container", "image": "ferry:0.1.0"}],
        }
    },
}


def manifest(api_version: str, kind: str, spec: dict[str, Any], name: str = "ferry") -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec}


def test_the_project_carries_the_schemas_it_needs_and_none_over_2_mib() -> None:
    names = {p.name for p in SCHEMAS}
    for needed in (
        "serving.kserve.io_inferenceservice_v1beta1.json",
        "serving.kserve.io_servingruntime_v1alpha1.json",
        "serving.kserve.io_clusterservingruntime_v1alpha1.json",
        "monitoring.coreos.com_servicemonitor_v1.json",
        "monitoring.coreos.com_podmonitor_v1.json",
        "monitoring.coreos.com_prometheusrule_v1.json",
        "keda.sh_scaledobject_v1alpha1.json",
    ):
        assert needed in names
    readme = (ROOT / "deploy" / "schemas" / "README.md").read_text()
    for path in SCHEMAS:
        assert path.stat().st_size < 2 * 1024 * 1024, path
        assert path.name in readme, f"{path.name} has no source line in deploy/schemas/README.md"


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.stem)
def test_every_strict_schema_compiles(path: Path) -> None:
    Draft7Validator.check_schema(kv.strict(json.loads(path.read_text())))


def test_a_valid_inferenceservice_passes() -> None:
    assert kv.validate_document(ISVC) == []


@pytest.mark.parametrize(
    ("where", "typo", "message"),
    [
        (
            ("spec", "predictor"),
            "minReplica",
            'spec.predictor.minReplica: unknown field "minReplica"',
        ),
        (("metadata",), "lables", 'metadata.lables: unknown field "lables"'),
        (("spec", "predictor", "containers", 0), "imagePullPolicyy", "unknown field"),
    ],
)
def test_a_typo_in_an_inferenceservice_fails(
    where: tuple[object, ...], typo: str, message: str
) -> None:
    doc = json.loads(json.dumps(ISVC))
    node = doc
    for key in where:
        node = node[key]
    node[typo] = 1
    problems = kv.validate_document(doc)
    assert problems and message in problems[0]


def test_a_typo_in_a_servicemonitor_fails() -> None:
    doc = manifest(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        {"selector": {"matchLabels": {"app": "ferry"}}, "endpoints": [{"port": "http", "intervall": "15s"}]},
    )
    assert kv.validate_document(doc) == [
        'spec.endpoints[0].intervall: unknown field "intervall" (did you mean "interval"?)'
    ]
    del doc["spec"]["endpoints"][0]["intervall"]
    assert kv.validate_document(doc) == []


@pytest.mark.parametrize("kind", ["ClusterServingRuntime", "ServingRuntime"])
def test_a_typo_in_a_serving_runtime_fails(kind: str) -> None:
    doc = manifest(
        "serving.kserve.io/v1alpha1",
        kind,
        {
            "supportedModelFormats": [{"name": "ctranslate2", "autoSelect": True}],
            "containers": [{"name": "kserve-container", "image": "ferry:0.1.0"}],
        },
    )
    assert kv.validate_document(doc) == []
    doc["spec"]["supportedModelFormats"][0]["autoselect"] = True
    assert kv.validate_document(doc) == [
        'spec.supportedModelFormats[0].autoselect: unknown field "autoselect" (did you mean "autoSelect"?)'
    ]


def test_a_typo_in_a_builtin_kind_fails_under_kubernetes_validate_strict() -> None:
    pod = {"restartPolicy": "Never", "containers": [{"name": "a", "image": "b"}]}
    job = manifest("batch/v1", "Job", {"backoffLimit": 0, "template": {"spec": pod}}, name="x")
    assert kv.validate_document(job) == []
    job["spec"]["backofLimit"] = 0
    problems = kv.validate_document(job)
    assert problems and "backofLimit" in problems[0]


def test_a_custom_kind_without_a_schema_is_an_error_not_a_skip() -> None:
    problems = kv.validate_document(
        {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob", "metadata": {"name": "x"}}
    )
    assert problems and "no schema file" in problems[0]


def test_cli_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps(ISVC))
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {a: b}\nextra: 1\n")
    assert kv.main([str(good)]) == 0
    assert kv.main([str(good), str(bad)]) == 1
    assert "INVALID" in capsys.readouterr().out
