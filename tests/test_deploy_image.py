"""The container image's Dockerfile: hadolint-clean and built the way the manifests expect."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import ROOT

HADOLINT = ROOT / ".venv" / "bin" / "hadolint"
DOCKERFILE = ROOT / "Dockerfile"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_is_clean() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install kserve\nRUN cd /tmp\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout  # :latest


def test_image_shape() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert re.search(r"^ARG VARIANT=cpu", text, re.M) and "cuda" in text
    assert 'ENTRYPOINT ["python", "-m", "predictor"]' in text
    (user,) = re.findall(r"^USER (\S+)", text, re.M)
    assert user.split(":")[0] not in ("root", "0")
    assert "FERRY_MODEL_DIR=/mnt/models" in text
    assert re.search(r"^EXPOSE 8080 8081$", text, re.M)


def test_build_context_leaves_out_venv_models_and_git() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*"  # everything out, then only what the build needs back in
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "predictor/", "deploy/image/", "wheelhouse/"}


def test_python_packages_come_from_the_hash_locked_wheelhouse_only() -> None:
    text = DOCKERFILE.read_text()
    installs = [line for line in text.splitlines() if "pip install" in line or line.strip().startswith("&& $pip")]
    assert installs
    assert 'pip="/opt/ferry/bin/pip install --no-index --find-links /wheels --require-hashes"' in text
    for name in ("requirements.lock", "build-requirements.lock", "cuda-requirements.lock"):
        assert f"/wheels/{name}" in text
        lock = (ROOT / "deploy" / "image" / name).read_text()
        pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, re.M)
        assert pins and lock.count("--hash=sha256:") == len(pins), name
    # ferry itself is the only thing installed without a hash (it is the build context)
    assert "pip install --no-index --no-deps --no-build-isolation ." in text


def test_the_lock_pins_what_pyproject_asks_for() -> None:
    import tomllib

    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lock = (ROOT / "deploy" / "image" / "requirements.lock").read_text()
    pinned = dict(re.findall(r"^([a-z0-9_.-]+)==(\S+) \\$", lock, re.M))
    for requirement in wanted:
        name = re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pinned, f"{name} is in pyproject.toml but not in deploy/image/requirements.lock: make lock"
        if "==" in requirement:
            assert pinned[name] == requirement.split("==")[1].strip(), name


def test_image_build_artifacts_are_never_committed() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    for pattern in (".image/", "wheelhouse/", "*.whl", "*.tar"):
        assert pattern in ignored
