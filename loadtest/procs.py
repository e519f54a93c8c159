"""Server subprocesses for the benchmark: free loopback ports, readiness, CPU and peak RSS, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


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


@dataclass
class Server:
    """One server under test, running as a subprocess on 127.0.0.1."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    ready_path: str
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; log: {self.log_path}\n"
                    + self.log_tail()
                )
            try:
                if http_get(self.url + self.ready_path, timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)  # polling another process: there is no event to wait on
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; log: {self.log_path}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

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

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    port: int,
    ready_path: str,
    log_dir: Path,
) -> Server:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.update(env)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return Server(name, process, port, ready_path, log_path)


def start_ferry(
    name: str, *, log_dir: Path, settings: dict[str, object], model_name: str = "opt-125m"
) -> Server:
    """`python -m predictor` on 127.0.0.1 with FERRY_* settings (engine, threads, batcher)."""
    http_port, grpc_port = free_ports(2)
    env = {"FERRY_HOST": HOST, "FERRY_MODEL_NAME": model_name, "FERRY_ACCESS_LOG": "false"}
    env.update({f"FERRY_{key.upper()}": str(value) for key, value in settings.items()})
    server = start_server(
        name,
        ["-m", "predictor", "--http_port", str(http_port), "--grpc_port", str(grpc_port)],
        env=env,
        port=http_port,
        ready_path=f"/v2/models/{model_name}/ready",
        log_dir=log_dir,
    )
    server.extra["grpc_target"] = f"{HOST}:{grpc_port}"
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
