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
    assert allowed == {"pyproject.toml", "README.md", "predictor/"}
