"""`make image-test`: run ferry's image as a pod would and call every protocol it serves.

The container runs with a read-only root filesystem, uid 10001, every capability dropped, no new
privileges and the model mounted read-only at /mnt/models (what KServe's storage-initializer
provides). It shares the host's network (podman on a root host without a working bridge) and binds
127.0.0.1 only (FERRY_HOST). Then: V1, V2 REST, V2 gRPC, /generate, OpenAI completions, /metrics,
and SIGTERM, after which the container must exit 0. Prints one line per check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MODEL = "opt-125m"
PROMPT = "Hello World, what is your name dog?"


def http(port: int, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check(label: str, ok: bool, detail: str) -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'} {label:<28} {detail}", flush=True)
    return ok


def grpc_infer(port: int) -> tuple[bool, str]:
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=10)
        request = pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="text", datatype="BYTES", shape=[1],
                    contents=pb.InferTensorContents(bytes_contents=[PROMPT.encode()]),
                )
            ],
        )
        request.parameters["max_new_tokens"].int64_param = 4
        response = stub.ModelInfer(request, timeout=30)
    outputs = {o.name: o for o in response.outputs}
    texts: list[str] = []
    for i, out in enumerate(response.outputs):
        if out.contents.bytes_contents:
            texts += [b.decode() for b in out.contents.bytes_contents]
        elif response.raw_output_contents:
            texts.append(f"<{len(response.raw_output_contents[i])} raw bytes>")
    return ready.ready and bool(texts), f"ready={ready.ready} outputs={sorted(outputs)} text={texts[:1]!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--container", default="podman")
    parser.add_argument("--image", default="ferry:0.1.0")
    parser.add_argument("--model-dir", type=Path, default=Path("models/tiny"))
    parser.add_argument("--http-port", type=int, default=18080)
    parser.add_argument("--grpc-port", type=int, default=18081)
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    args = parser.parse_args()
    name = f"ferry-image-test-{int(time.time())}"
    size = subprocess.run(
        [args.container, "image", "inspect", "--format", "{{.Size}}", args.image],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    print(f"image-test: {args.image}, {int(size) / 1e6:.0f} MB", flush=True)
    run = [
        args.container, "run", "-d", "--name", name, "--network", "host",
        "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--user", "10001:10001", "-v", f"{args.model_dir.resolve()}:/mnt/models:ro",
        "-e", "FERRY_HOST=127.0.0.1", "-e", "FERRY_DEVICE=cpu", "-e", "FERRY_DRAIN_GRACE_S=5",
        args.image, "--http_port", str(args.http_port), "--grpc_port", str(args.grpc_port),
    ]
    subprocess.run(run, check=True, stdout=subprocess.DEVNULL)
    ok = True
    try:
        start = time.monotonic()
        while time.monotonic() - start < args.ready_timeout:
            try:
                if http(args.http_port, "GET", f"/v2/models/{MODEL}/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        status, _ = http(args.http_port, "GET", f"/v2/models/{MODEL}/ready")
        ok &= check("ready", status == 200, f"{status} after {time.monotonic() - start:.1f} s")
        uid = subprocess.run([args.container, "exec", name, "id", "-u"], capture_output=True, text=True).stdout
        ok &= check("uid", uid.strip() == "10001", uid.strip())
        touch = subprocess.run([args.container, "exec", name, "touch", "/opt/ferry/x"], capture_output=True, text=True)
        ok &= check("read-only root", touch.returncode != 0, touch.stderr.strip()[-60:])

        status, body = http(args.http_port, "POST", f"/v1/models/{MODEL}:predict",
                            {"instances": [PROMPT], "parameters": {"max_new_tokens": 4}})
        ok &= check("V1 predict", status == 200, f"{status} {body.decode()[:160]}")
        status, body = http(args.http_port, "POST", f"/v2/models/{MODEL}/infer", {
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}],
            "parameters": {"max_new_tokens": 4},
        })
        ok &= check("V2 REST infer", status == 200, f"{status} {body.decode()[:160]}")
        try:
            good, detail = grpc_infer(args.grpc_port)
        except Exception as exc:  # report it as a failed check, with the reason
            good, detail = False, f"{type(exc).__name__}: {exc}"[:200]
        ok &= check("V2 gRPC ModelInfer", good, detail)
        status, body = http(args.http_port, "POST", "/generate", {"text": PROMPT, "max_new_tokens": 10})
        ok &= check("/generate", status == 200 and b"generated_text" in body, f"{status} {body.decode()[:160]}")
        status, body = http(args.http_port, "POST", "/openai/v1/completions",
                            {"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
        ok &= check("OpenAI completions", status == 200, f"{status} {body.decode()[:160]}")
        status, body = http(args.http_port, "GET", "/metrics")
        families = sorted({line.split()[2] for line in body.decode().splitlines()
                           if line.startswith("# TYPE ferry_")})
        ok &= check("/metrics", status == 200 and bool(families), f"{status} {len(families)} ferry_* families")

        sent = time.monotonic()
        subprocess.run([args.container, "kill", "--signal", "TERM", name], check=True, stdout=subprocess.DEVNULL)
        code = subprocess.run([args.container, "wait", name], capture_output=True, text=True, timeout=60).stdout
        ok &= check("SIGTERM", code.strip() == "0", f"exit {code.strip()} after {time.monotonic() - sent:.1f} s")
    finally:
        if not ok:
            logs = subprocess.run([args.container, "logs", name], capture_output=True, text=True)
            print((logs.stdout + logs.stderr)[-3000:], file=sys.stderr)
        subprocess.run([args.container, "rm", "-f", name], capture_output=True)
    print(f"image-test: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
