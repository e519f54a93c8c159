"""The process harness that the benchmark, the reliability run and the tests share: free loopback
ports, a server subprocess (readiness, log, CPU and peak RSS, SIGTERM then kill), polling, and
ferry's /metrics parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
READY_POLL_S = 0.1


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: all held open at once, so none is handed out twice."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def poll(check: Callable[[], bool], timeout_s: float, interval_s: float) -> bool:
    """Calls `check` until it holds or `timeout_s` has passed; False if it never held. For
    another process's state, which has no event to wait on."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


# ---- /metrics --------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {'name{label="v",...}': value}, labels sorted (bare name without labels)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def metric_total(values: dict[str, float], name: str) -> float:
    """One sample name summed over all its label sets (e.g. every outcome of a counter)."""
    return sum(value for key, value in values.items() if key == name or key.startswith(name + "{"))


def scrape_metrics(url: str, timeout: float = 10.0) -> dict[str, float]:
    """GET `url` (a /metrics endpoint) and parse it; an answer other than 200 is an error."""
    status, body = http_get(url, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"{url} answered {status}")
    return parse_metrics(body.decode())


# ---- server processes ------------------------------------------------------------------------


@dataclass
class Server:
    """One server under test, a subprocess on 127.0.0.1 logging to `log_path`."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    ready_path: str
    log_path: Path
    own_process_group: bool = False  # stop() signals the whole group (a wrapper and its child)
    grpc_port: int | None = None
    model_name: str = ""
    env: dict[str, str] = field(default_factory=dict)  # what was added to the inherited environment
    extra: dict[str, str] = field(default_factory=dict)  # "grpc_target", for older readers

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def http_port(self) -> int:
        return self.port

    @property
    def grpc_target(self) -> str:
        if self.grpc_port is None:
            raise AttributeError(f"{self.name} has no gRPC port")
        return f"{HOST}:{self.grpc_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Polls `ready_path` until it answers 200; raises (with the log's tail) if the process
        exits first or the time runs out."""

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; log: {self.log_path}\n{self.log_tail()}"
                )
            try:
                return http_get(self.url + self.ready_path, timeout=1.0)[0] == 200
            except (OSError, http.client.HTTPException):  # not listening yet, or a stranger's port
                return False

        if not poll(ready, timeout_s, READY_POLL_S):
            raise RuntimeError(
                f"{self.name} not ready after {timeout_s:.0f} s; log: {self.log_path}\n{self.log_tail()}"
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log()[-chars:]
        except OSError:
            return ""

    def metrics(self, path: str = "/metrics") -> dict[str, float]:
        return scrape_metrics(self.url + path)

    def wait_metric(
        self, key: str, predicate: Callable[[float], bool], timeout_s: float = 30.0, interval_s: float = 0.02
    ) -> float:
        """Polls /metrics until `predicate(value of key)` holds; returns the last value read
        (NaN while the series is absent), whether or not it held."""
        last = [float("nan")]

        def holds() -> bool:
            last[0] = self.metrics().get(key, float("nan"))
            return predicate(last[0])

        poll(holds, timeout_s, interval_s)
        return last[0]

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and any children it started."""
        try:
            proc = psutil.Process(self.pid)
            total = sum(proc.cpu_times()[:2])
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += sum(child.cpu_times()[:2])
            return float(total)
        except psutil.Error:
            return 0.0

    def peak_rss_bytes(self) -> int:
        """VmHWM: the peak resident set size since the process started."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def _signal(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.own_process_group:
                os.killpg(self.pid, signum)
            else:
                self.process.send_signal(signum)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (a graceful drain), then SIGKILL if it is still running after `timeout_s`."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int:
        if self.process.poll() is None:
            self._signal(signal.SIGKILL)
        return self.process.wait(timeout=10)


def start_process(
    name: str,
    command: Sequence[str],
    *,
    port: int,
    ready_path: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
    own_process_group: bool = False,
) -> Server:
    """`command` in the repository root, stdout and stderr to log_dir/<name>.log (a new run of the
    same name overwrites it), with `env` added to this process's environment. Returns at once:
    call `wait_ready`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=own_process_group,
        )
    return Server(name, process, port, ready_path, log_path, own_process_group, env=dict(env or {}))


def start_server(
    name: str, argv: list[str], *, env: dict[str, str], port: int, ready_path: str, log_dir: Path
) -> Server:
    """`python argv...` with this interpreter (see start_process)."""
    return start_process(
        name, [sys.executable, *argv], port=port, ready_path=ready_path, log_dir=log_dir, env=env
    )


def start_ferry(
    name: str,
    *,
    log_dir: Path,
    settings: dict[str, object],
    model_name: str = "opt-125m",
    args: Sequence[str] = (),
) -> Server:
    """`python -m predictor` on 127.0.0.1 with FERRY_* settings (engine, threads, batcher, ...)
    and extra command-line `args`. Returns at once: call `wait_ready`."""
    http_port, grpc_port = free_ports(2)
    env = {"FERRY_HOST": HOST, "FERRY_MODEL_NAME": model_name}
    env.update({f"FERRY_{key.upper()}": str(value) for key, value in settings.items()})
    argv = ["-m", "predictor", "--http_port", str(http_port), "--grpc_port", str(grpc_port), *args]
    server = start_server(
        name, argv, env=env, port=http_port, ready_path=f"/v2/models/{model_name}/ready", log_dir=log_dir
    )
    server.grpc_port = grpc_port
    server.model_name = model_name
    server.extra["grpc_target"] = server.grpc_target
    return server


def start_baseline(
    name: str,
    module: str,
    *,
    log_dir: Path,
    model_dir: Path,
    engine: str,
    inter_threads: int,
    intra_threads: int,
    compute_type: str = "auto",
) -> Server:
    """One of loadtest/baselines (naive, timer batcher) on a free loopback port."""
    port = free_port()
    argv = [
        "-m", module,
        "--host", HOST,
        "--port", str(port),
        "--model-dir", str(model_dir),
        "--engine", engine,
        "--inter-threads", str(inter_threads),
        "--intra-threads", str(intra_threads),
        "--compute-type", compute_type,
    ]  # fmt: skip
    return start_server(name, argv, env={}, port=port, ready_path="/health", log_dir=log_dir)


def start_kserve_floor(log_dir: Path, model_name: str = "opt-125m") -> Server:
    """KServe's floor: an instant kserve.Model on KServe's ModelServer, on 127.0.0.1."""
    port = free_port()
    argv = ["-m", "loadtest.baselines.kserve_floor", "--port", str(port), "--model-name", model_name]
    return start_server(
        "kserve-floor", argv, env={}, port=port, ready_path=f"/v1/models/{model_name}", log_dir=log_dir
    )
