"""Render helm/ferry offline (PyPI helm-python-sdk, Helm's own engine) and parse what comes out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "ferry"
CI_DIR = CHART / "ci"
MANIFESTS = ROOT / "manifests"
KUBE_VERSION = "1.31.0"
NAMESPACE = "ferry"


def scenarios() -> dict[str, Path]:
    """ci/<name>-values.yaml -> {name: path}."""
    return {p.name.removesuffix("-values.yaml"): p for p in sorted(CI_DIR.glob("*-values.yaml"))}


def load_values(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: values must be a mapping")
    return values


def render(
    values: dict[str, Any] | None = None, *, name: str = "ferry", namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included), as `helm template` gives it."""
    import helm_python

    return dict(
        helm_python.Chart.load(str(CHART)).render(values or {}, name=name, namespace=namespace)
    )


def render_objects(
    values: dict[str, Any] | None = None, *, name: str = "ferry", namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders, parsed (YAML errors raise)."""
    from deploy.k8s_validate import iter_documents

    objects: list[dict[str, Any]] = []
    for path, text in sorted(render(values, name=name, namespace=namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in iter_documents(text):
            if not isinstance(doc, dict):
                raise ValueError(f"{path}: rendered a non-object document: {doc!r}")
            objects.append(doc)
    return objects


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    import helm_python

    return dict(helm_python.lint(str(CHART), values, strict=True, kube_version="v" + KUBE_VERSION))


def find(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]
