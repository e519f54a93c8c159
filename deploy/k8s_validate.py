#!/usr/bin/env python3
"""Strict offline validation of ferry's Kubernetes manifests and rendered chart.

Two kinds of objects, two validators:

* built-in kinds (``v1``, ``apps/v1``, ``batch/v1``, ``policy/v1``, ``networking.k8s.io/v1`` ...)
  go to PyPI ``kubernetes-validate --strict`` against a named Kubernetes version;
* custom resources (InferenceService, ServiceMonitor, PodMonitor, PrometheusRule, KEDA kinds)
  are checked against the CRD ``openAPIV3Schema`` files in ``deploy/schemas/`` after
  :func:`strict` has closed every object schema (``additionalProperties: false``), so a typo such
  as ``spec.predictor.minReplica`` fails here the way ``kubectl apply --validate=strict`` fails
  against a live API server.  A custom kind with no schema file is an error, not a skip.

The strict-schema rewrite follows ``strict.py`` from the project's shared schema notes (see
``deploy/schemas/README.md``): close objects that list ``properties`` unless marked
``x-kubernetes-preserve-unknown-fields``; leave ``allOf``/``anyOf``/``oneOf`` branches open;
replace a bare root ``metadata`` with a closed ObjectMeta; ``nullable`` -> ``[T, "null"]``;
Go-only ``^(?i)`` patterns rewritten for Python.  Not enforced: CEL rules, ``format``, list-map
key uniqueness, defaulting.

Usage: python deploy/k8s_validate.py [--kube-version 1.31.0] FILE.yaml ... ('-' = stdin)
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
DEFAULT_KUBE_VERSION = "1.31.0"

_STR: dict[str, Any] = {"type": "string"}
_STR_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": _STR,
        "generateName": _STR,
        "namespace": _STR,
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
        "finalizers": {"type": "array", "items": _STR},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": _STR,
        "resourceVersion": _STR,
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
        "selfLink": _STR,
    },
}
_ROOT_DEFAULTS: dict[str, Any] = {"apiVersion": _STR, "kind": _STR, "metadata": {"type": "object"}}


# --------------------------------------------------------------------------- strict schemas


def _is_bare_object(s: Any) -> bool:
    return (
        isinstance(s, dict)
        and s.get("type") == "object"
        and "properties" not in s
        and "additionalProperties" not in s
        and not s.get("x-kubernetes-preserve-unknown-fields")
    )


def _python_pattern(pattern: str) -> str | None:
    """Go RE2 accepts ``^(?i)...``; Python wants global flags first.  None if unusable."""
    for candidate in (pattern, re.sub(r"^\^\(\?([imsx]+)\)", r"(?\1)^", pattern)):
        try:
            re.compile(candidate)
            return candidate
        except re.error:
            continue
    return None


def _close(s: dict[str, Any], root: bool = False) -> None:
    if isinstance(s.get("pattern"), str):
        fixed = _python_pattern(s["pattern"])
        if fixed is None:
            s["x-strict-unsupported-pattern"] = s.pop("pattern")
        else:
            s["pattern"] = fixed
    if s.get("nullable") is True and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s and "type" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if root or s.get("x-kubernetes-embedded-resource"):
        props = s.setdefault("properties", {})
        for key, sub in _ROOT_DEFAULTS.items():
            props.setdefault(key, copy.deepcopy(sub))
        if _is_bare_object(props["metadata"]):
            props["metadata"] = copy.deepcopy(OBJECT_META)
    props = s.get("properties")
    if isinstance(props, dict):
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        for sub in props.values():
            if isinstance(sub, dict):
                _close(sub)
    for key in ("items", "additionalProperties"):
        sub = s.get(key)
        if isinstance(sub, dict):
            _close(sub)
        elif isinstance(sub, list):
            for item in sub:
                if isinstance(item, dict):
                    _close(item)
    for sub in (s.get("patternProperties") or {}).values():
        if isinstance(sub, dict):
            _close(sub)


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a CRD ``openAPIV3Schema`` that rejects unknown fields."""
    out = copy.deepcopy(schema)
    _close(out, root=True)
    return out


# --------------------------------------------------------------------------- validation


def is_builtin(api_version: str) -> bool:
    """``v1``, ``apps/v1``, ``policy/v1``, ``networking.k8s.io/v1``: kinds the API server owns."""
    if "/" not in api_version:
        return True
    group = api_version.split("/", 1)[0]
    return "." not in group or group.endswith(".k8s.io")


def schema_path(api_version: str, kind: str, schema_dir: Path = SCHEMA_DIR) -> Path:
    group, version = api_version.split("/", 1)
    return schema_dir / f"{group}_{kind.lower()}_{version}.json"


_VALIDATORS: dict[Path, Any] = {}


def _crd_validator(path: Path) -> Any:
    if path not in _VALIDATORS:
        from jsonschema import Draft7Validator

        _VALIDATORS[path] = Draft7Validator(strict(json.loads(path.read_text(encoding="utf-8"))))
    return _VALIDATORS[path]


def _fmt_path(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _messages(error: Any) -> Iterator[str]:
    where = list(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = list((error.schema.get("properties") or {}).keys())
        patterns = list((error.schema.get("patternProperties") or {}).keys())
        for key in error.instance:
            if key in known or any(re.search(p, key) for p in patterns):
                continue
            hint = difflib.get_close_matches(str(key), known, n=1)
            extra = f' (did you mean "{hint[0]}"?)' if hint else ""
            yield f'{_fmt_path([*where, key])}: unknown field "{key}"{extra}'
        return
    yield f"{_fmt_path(where)}: {error.message}"


def validate_crd(doc: dict[str, Any], schema_dir: Path = SCHEMA_DIR) -> list[str]:
    """Problems of one custom resource; a kind without a schema file is a problem too."""
    path = schema_path(str(doc["apiVersion"]), str(doc["kind"]), schema_dir)
    if not path.is_file():
        return [f"no schema file {path.name} in {schema_dir}: add the CRD schema to validate it"]
    errors = sorted(
        _crd_validator(path).iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]
    )
    msgs: list[str] = []
    for err in errors:
        for m in _messages(err):
            if m not in msgs:
                msgs.append(m)
    return msgs


def validate_builtin(doc: dict[str, Any], kube_version: str = DEFAULT_KUBE_VERSION) -> list[str]:
    """Problems of one built-in object, per kubernetes-validate's strict schemas."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = _fmt_path(list(exc.path)) if getattr(exc, "path", None) else "<root>"
        return [f"{where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [
            f"no Kubernetes {kube_version} schema for {label(doc)} "
            f"({doc.get('apiVersion')}): {exc}"
        ]
    return []


def validate_document(doc: Any, kube_version: str = DEFAULT_KUBE_VERSION) -> list[str]:
    """Every problem of one parsed object (empty list = valid)."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return ["<root>: not a Kubernetes object (apiVersion/kind missing)"]
    if is_builtin(str(doc["apiVersion"])):
        return validate_builtin(doc, kube_version)
    return validate_crd(doc)


def _yaml_loader() -> Any:
    import yaml

    class Loader(yaml.SafeLoader):  # timestamps stay strings, as the API server sees them
        pass

    Loader.yaml_implicit_resolvers = {
        k: [r for r in v if r[0] != "tag:yaml.org,2002:timestamp"]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return Loader


def iter_documents(text: str) -> Iterator[Any]:
    """Every object of a multi-document YAML text (``kind: *List`` expanded, empty docs dropped)."""
    import yaml

    for doc in yaml.load_all(text, Loader=_yaml_loader()):
        if doc is None:
            continue
        if (
            isinstance(doc, dict)
            and str(doc.get("kind", "")).endswith("List")
            and isinstance(doc.get("items"), list)
        ):
            yield from doc["items"]
        else:
            yield doc


def label(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "?"
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return f"{doc.get('kind')}/{(meta or {}).get('name', '?')}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Strictly validate Kubernetes objects offline.")
    ap.add_argument("files", nargs="+", help="YAML files ('-' for stdin)")
    ap.add_argument(
        "--kube-version", default=DEFAULT_KUBE_VERSION, help="Kubernetes version for built-in kinds"
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    args = ap.parse_args(argv)
    failed = 0
    for fname in args.files:
        try:
            text = sys.stdin.read() if fname == "-" else Path(fname).read_text(encoding="utf-8")
            docs = list(iter_documents(text))
        except Exception as exc:  # unreadable file or YAML syntax error
            print(f"{fname}: ERROR {exc}")
            failed += 1
            continue
        for i, doc in enumerate(docs):
            problems = validate_document(doc, args.kube_version)
            if problems:
                failed += 1
                print(f"{fname}[{i}] {label(doc)}: INVALID")
                for p in problems:
                    print(f"  {p}")
            elif not args.quiet:
                print(f"{fname}[{i}] {label(doc)}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
