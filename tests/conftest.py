"""Shared fixtures: the real KServe ModelServer running ferry in a subprocess on 127.0.0.1, started
and stopped by loadtest/harness.py (the same harness as the benchmark's)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loadtest.harness import ROOT, Server, free_port, free_ports
from loadtest.harness import start_ferry as start_ferry_process

__all__ = ["ROOT", "free_port", "free_ports"]  # imported from here by several test modules

TINY_MODEL = ROOT / "models" / "tiny"
REFERENCE_PROMPT = "Hello World, what is your name dog?"
READY_TIMEOUT_S = 60.0
_SERVER_NUMBERS = itertools.count(1)  # each server its own log, also when they share a directory

# A ferry under test is a harness Server (url, grpc_target, model_name, log(), metrics(), ...).
FerryProcess = Server


def ensure_tiny_model() -> Path:
    if not (TINY_MODEL / "model.bin").is_file():
        subprocess.run(
            [sys.executable, "-m", "predictor.build_model", "tiny", str(TINY_MODEL)], check=True, cwd=ROOT
        )
    return TINY_MODEL


def start_ferry(
    tmp_dir: Path, *, model_name: str = "opt-125m", args: list[str] | None = None, **settings: object
) -> FerryProcess:
    """Starts `python -m predictor` on the tiny model (unless `model_dir` is given) with FERRY_*
    settings, and waits until the model is ready."""
    server = start_ferry_process(
        f"ferry-{next(_SERVER_NUMBERS)}",
        log_dir=tmp_dir,
        settings={"model_dir": ensure_tiny_model(), **settings},
        model_name=model_name,
        args=args or [],
    )
    try:
        server.wait_ready(READY_TIMEOUT_S)
    except BaseException:
        server.kill()
        raise
    return server


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
        ferry.kill()


@pytest.fixture(scope="session")
def ferry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerryProcess]:
    """One shared server on the tiny CTranslate2 model."""
    server = start_ferry(tmp_path_factory.mktemp("ferry"))
    yield server
    server.kill()


def scrape(ferry: FerryProcess) -> dict[str, float]:
    """ferry's /metrics as {'name{label="v",...}': value} (labels sorted)."""
    return ferry.metrics()


def wait_for_metric(ferry: FerryProcess, key: str, predicate: Callable[[float], bool], timeout: float = 30) -> float:
    """Polls /metrics until `predicate(value)` holds; fails the test if it never does."""
    value = ferry.wait_metric(key, predicate, timeout)
    if not predicate(value):
        raise AssertionError(f"{key} never satisfied the condition (last value {value})")
    return value
