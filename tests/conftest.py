"""Shared fixtures: the real KServe ModelServer running ferry in a subprocess on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "models" / "tiny"
REFERENCE_PROMPT = "Hello World, what is your name dog?"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all sockets are held open together, so none is handed out twice."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def ensure_tiny_model() -> Path:
    if not (TINY_MODEL / "model.bin").is_file():
        subprocess.run(
            [sys.executable, "-m", "predictor.build_model", "tiny", str(TINY_MODEL)], check=True, cwd=ROOT
        )
    return TINY_MODEL


@dataclass
class FerryProcess:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    model_name: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_ferry(
    tmp_dir: Path, *, model_name: str = "opt-125m", args: list[str] | None = None, **settings: object
) -> FerryProcess:
    """Starts `python -m predictor` with FERRY_* settings and waits until the model is ready."""
    http_port, grpc_port = free_ports(2)
    env = dict(os.environ)
    env.update(
        {
            "FERRY_HOST": "127.0.0.1",
            "FERRY_MODEL_NAME": model_name,
            "FERRY_MODEL_DIR": str(ensure_tiny_model()),
        }
    )
    for key, value in settings.items():
        env[f"FERRY_{key.upper()}"] = str(value)
    log_path = tmp_dir / f"ferry-{http_port}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "predictor", "--http_port", str(http_port), "--grpc_port", str(grpc_port)]
        + (args or []),
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    ferry = FerryProcess(process, http_port, grpc_port, model_name, log_path, env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ferry exited with {process.returncode}:\n{ferry.log()}")
        try:
            if httpx.get(f"{ferry.url}/v2/models/{model_name}/ready", timeout=1).status_code == 200:
                return ferry
        except (httpx.TransportError, httpx.RemoteProtocolError):
            pass
        time.sleep(0.1)  # polling another process's readiness: there is no event to wait on
    process.kill()
    raise RuntimeError(f"ferry did not become ready:\n{ferry.log()}")


FerryFactory = Callable[..., FerryProcess]


@pytest.fixture
def ferry_factory(tmp_path: Path) -> Iterator[FerryFactory]:
    started: list[FerryProcess] = []

    def factory(**kwargs: object) -> FerryProcess:
        ferry = start_ferry(tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(ferry)
        return ferry

    yield factory
    for ferry in started:
        if ferry.process.poll() is None:
            ferry.process.kill()
            ferry.process.wait()


@pytest.fixture(scope="session")
def ferry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerryProcess]:
    """One shared server on the tiny CTranslate2 model."""
    server = start_ferry(tmp_path_factory.mktemp("ferry"))
    yield server
    server.process.kill()
    server.process.wait()


def scrape(ferry: FerryProcess) -> dict[str, float]:
    """ferry's /metrics as {'name{label="v",...}': value} (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{ferry.url}/metrics", timeout=10).text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def wait_for_metric(ferry: FerryProcess, key: str, predicate: Callable[[float], bool], timeout: float = 30) -> float:
    """Polls /metrics until `predicate(value)` holds (another process's state: nothing to await)."""
    deadline = time.monotonic() + timeout
    value = float("nan")
    while time.monotonic() < deadline:
        value = scrape(ferry).get(key, float("nan"))
        if predicate(value):
            return value
        time.sleep(0.02)
    raise AssertionError(f"{key} never satisfied the condition (last value {value})")
