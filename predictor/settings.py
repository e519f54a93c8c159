"""ferry's settings: one pydantic-settings class, read from FERRY_* env and CLI flags.

CLI flags are layered on KServe's own argparse parser, so `--http_port`, `--grpc_port` and
friends keep working; ferry's flags are the field names with dashes (`--max-batch-size 32`).
Precedence: CLI flag > FERRY_* environment variable > default.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KSERVE_MODEL_MOUNT = Path("/mnt/models")
LOCAL_MODEL_DIR = Path("models/opt-125m")


def default_model_dir() -> Path:
    """KServe's storage-initializer convention in a pod, the `make` build output locally."""
    return KSERVE_MODEL_MOUNT if KSERVE_MODEL_MOUNT.is_dir() else LOCAL_MODEL_DIR


def _thread_count(value: Any) -> int | str:
    """`auto`, or a positive integer; 0 (CTranslate2's own "choose for me") means auto."""
    if isinstance(value, str):
        value = value.strip().lower()
        if value == "auto":
            return value
        if not value.isdigit():
            raise ValueError(f"must be auto or an integer from 1 to 256, got {value!r}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
        raise ValueError(f"must be auto or an integer from 1 to 256, got {value!r}")
    return "auto" if value == 0 else value


ThreadCount = Annotated[Literal["auto"] | int, BeforeValidator(_thread_count)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="forbid")

    # --- model and engine -------------------------------------------------------------
    model_dir: Path = Field(default_factory=default_model_dir, description="CTranslate2 model directory")
    model_name: str = Field("opt-125m", min_length=1, description="name on the endpoint paths")
    engine: Literal["ctranslate2", "simulated"] = Field(
        "ctranslate2", description="ctranslate2, or simulated (a timing model, no weights)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when CTranslate2 sees a GPU")
    device_index: int = Field(0, ge=0, description="GPU index when device is cuda")
    compute_type: str = Field("auto", description="auto: int8_float16 on GPU, int8 on CPU")
    inter_threads: ThreadCount = Field(
        "auto",
        description="CTranslate2 batches run at once (engine slots); auto: 2 on CPU (each with half the "
        "cores, plus an all-core generator for a batch that runs alone), 1 on GPU",
    )
    intra_threads: ThreadCount = Field(
        "auto", description="threads per batch; auto: the cores split between the slots"
    )

    # --- batcher ----------------------------------------------------------------------
    max_batch_size: int = Field(50, ge=1, le=1024, description="most requests in one engine call")
    max_batch_wait_s: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="cap on the adaptive gathering window (zero at idle, never a fixed timer); 0 = never wait",
    )
    slots: int = Field(0, ge=0, le=64, description="engine calls in flight; 0 = the engine's concurrency")
    max_queue_size: int = Field(512, ge=1, le=100_000, description="waiting requests before 503")
    chunk_tokens: int = Field(
        0,
        ge=0,
        le=2048,
        description="an engine call runs at most this many steps; longer requests continue in the queue "
        "(re-reading what they generated) instead of holding a slot; 0 = off (measured not to pay on CPU)",
    )
    background_tokens: int = Field(
        32,
        ge=0,
        le=2048,
        description="requests asking more new tokens than this, with no stream and no stop strings, run in the "
        "background lane: on CPU, generators at low priority (nice 10) that give the cores to shorter work; "
        "0 = no background lane (on GPU there is none)",
    )

    # --- request limits ---------------------------------------------------------------
    default_max_new_tokens: int = Field(16, ge=1, description="when a request names none")
    max_new_tokens_limit: int = Field(256, ge=1, le=2048, description="largest max_new_tokens accepted")
    max_prompt_tokens: int = Field(1024, ge=1, le=2048, description="longest prompt accepted, in tokens")
    max_instances: int = Field(64, ge=1, le=4096, description="most prompts in one request")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest request body accepted")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="default per-request deadline")
    max_request_timeout_s: float = Field(120.0, gt=0, le=3600, description="largest deadline a client may ask")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After sent with 503")
    max_connections: int = Field(
        1024, ge=16, le=1_000_000, description="open HTTP connections/requests before uvicorn answers 503 unparsed"
    )

    # --- server -----------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="address the REST and gRPC servers bind")
    drain_grace_s: float = Field(
        20.0, ge=0, le=3600, description="SIGTERM: time queued work gets to finish (keep below the pod's grace)"
    )
    access_log: bool = Field(False, description="one log line per request (costs ~25 % at high rates)")

    # --- security and slow clients (docs/security.md) -----------------------------------
    api_key: SecretStr | None = Field(
        None,
        description="clients must send Authorization: Bearer <key> (health and /metrics stay open); unset = no key",
    )
    api_key_file: Path | None = Field(
        None, description="file holding the API key (a mounted Secret); wins over api_key"
    )
    control_routes: bool = Field(
        False, description="serve KServe's model repository load/unload routes (REST and gRPC); needs an API key"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=600, description="a connection must send a request's headers within this time"
    )
    body_timeout_s: float = Field(
        20.0, gt=0, le=3600, description="a request's body must arrive within this time after its headers"
    )
    max_header_bytes: int = Field(
        65_536, ge=1024, le=16_777_216, description="largest request line + headers; more is answered 431"
    )
    max_header_count: int = Field(100, ge=8, le=10_000, description="most request headers; more is answered 431")
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json: one JSON object per log line with request_id and traceparent"
    )
    chat_template: str = Field(
        "",
        description="chat completions: a Jinja2 template file or string (messages -> prompt); "
        "empty: a plain User:/Assistant: transcript for base models",
    )

    # --- simulated engine (engine=simulated) ------------------------------------------
    sim_prefill_s: float = Field(0.002, ge=0, description="simulated fixed cost per batch")
    sim_step_s: float = Field(0.0015, ge=0, description="simulated cost per decoding step")
    sim_step_per_seq_s: float = Field(0.00001, ge=0, description="simulated cost per step per sequence")
    sim_concurrency: int = Field(1, ge=1, le=64, description="simulated batches that can run at once")
    sim_background_slots: int = Field(
        0, ge=0, le=64, description="simulated background-lane slots (its calls only share the API)"
    )
    sim_fail_every: int = Field(0, ge=0, description="fault injection: every Nth simulated batch raises; 0 = never")
    sim_eos_after: int = Field(
        0, ge=0, description="simulated end token: the Nth generated token is EOS unless ignore_eos; 0 = never"
    )

    @field_validator("chat_template")
    @classmethod
    def _check_chat_template(cls, value: str) -> str:
        from predictor.chat_template import load_chat_template

        load_chat_template(value)  # raises ChatTemplateError (a ValueError) naming the problem
        return value

    @model_validator(mode="after")
    def _check_relations(self) -> Settings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must be <= "
                f"max_new_tokens_limit ({self.max_new_tokens_limit})"
            )
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError(
                f"request_timeout_s ({self.request_timeout_s}) must be <= "
                f"max_request_timeout_s ({self.max_request_timeout_s})"
            )
        if self.api_key_file is not None:
            try:
                key = self.api_key_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"api_key_file: cannot read {self.api_key_file} ({exc.strerror})") from None
            if not key:
                raise ValueError(f"api_key_file: {self.api_key_file} is empty")
            self.api_key = SecretStr(key)
        if self.api_key is not None and len(self.api_key.get_secret_value().strip()) < 16:
            raise ValueError("api_key: must be at least 16 characters (use a random token)")
        if self.control_routes and self.api_key is None:
            raise ValueError("control_routes: needs an API key (api_key or api_key_file); refusing to serve "
                             "model load/unload without one")
        if self.engine == "ctranslate2" and not self.model_dir.is_dir():
            raise ValueError(
                f"model_dir: {self.model_dir} is not a directory (build one with "
                "`python -m predictor.build_model random models/opt-125m`)"
            )
        return self


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per setting; defaults are None so that unset flags fall through to env."""
    group = parser.add_argument_group("ferry")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "model_name":
            continue  # KServe's parser already owns --model_name; read it from there
        group.add_argument(flag, dest=f"ferry_{name}", default=None, help=field.description)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Builds Settings from parsed flags (over env), exiting with a clear message when invalid."""
    overrides: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(args, f"ferry_{name}", None)
        if value is not None:
            overrides[name] = value
    kserve_model_name = getattr(args, "model_name", None)
    if "FERRY_MODEL_NAME" not in os.environ and kserve_model_name not in (None, "model"):
        overrides["model_name"] = kserve_model_name
    return load_settings(**overrides)


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = ["ferry: invalid settings:"]
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            env = f" (FERRY_{where.upper()} / --{where.replace('_', '-')})" if error["loc"] else ""
            lines.append(f"  {where}{env}: {error['msg']}")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
