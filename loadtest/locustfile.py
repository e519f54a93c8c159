"""Locust scenarios for ferry: the write-up's own test, and one user class per protocol.

Every user fires as fast as it can (no wait time), like the write-up's 40 users. Pick classes by
name on the command line; the prompt and lengths are flags (or LOCUST_* environment variables):

    locust -f loadtest/locustfile.py GenerateUser --headless -u 40 -r 40 -t 60s \\
        --host http://127.0.0.1:8080 --csv bench-results/locust --html bench-results/locust.html

| class                 | request                                                          |
| --------------------- | ---------------------------------------------------------------- |
| GenerateUser          | POST /generate {"text", "max_new_tokens"} (the write-up's body)  |
| MixedGenerateUser     | /generate, 80 % short (--max-new-tokens), 20 % long (--long-...) |
| V1User                | POST /v1/models/{model}:predict {"instances": [...]}             |
| V2RestUser            | POST /v2/models/{model}/infer (Open Inference Protocol)          |
| V2GrpcUser            | gRPC ModelInfer on --grpc-target (default: host's, port 8081)    |
| OpenAICompletionsUser | POST /openai/v1/completions {"model", "prompt", "max_tokens"}    |
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from locust import FastHttpUser, User, constant, events, task
from locust.env import Environment

DEFAULT_PROMPT = "Hello World, what is your name dog?"


def _init_grpc_for_gevent() -> None:
    """grpc's client must cooperate with locust's gevent, or one waiting call blocks every user.
    Must run before any channel exists; idempotent."""
    global _grpc_ready
    if not _grpc_ready:
        from grpc.experimental import gevent as grpc_gevent

        grpc_gevent.init_gevent()
        _grpc_ready = True


_grpc_ready = False
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@functools.cache
def _messages() -> Any:
    """KServe's generated Open Inference Protocol messages, loaded from their file: importing
    them through the `kserve` package would import all of KServe (seconds of CPU, during which
    every locust user stands still)."""
    spec = importlib.util.find_spec("kserve")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the kserve package is needed for V2GrpcUser")
    path = Path(spec.submodule_search_locations[0]) / "protocol/grpc/grpc_predict_v2_pb2.py"
    module_spec = importlib.util.spec_from_file_location("grpc_predict_v2_pb2", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("ferry")
    group.add_argument("--prompt", default=DEFAULT_PROMPT, env_var="LOCUST_PROMPT")
    group.add_argument("--max-new-tokens", type=int, default=10, env_var="LOCUST_MAX_NEW_TOKENS")
    group.add_argument(
        "--long-max-new-tokens", type=int, default=100, env_var="LOCUST_LONG_MAX_NEW_TOKENS"
    )
    group.add_argument("--long-fraction", type=float, default=0.2, env_var="LOCUST_LONG_FRACTION")
    group.add_argument("--model-name", default="opt-125m", env_var="LOCUST_MODEL_NAME")
    group.add_argument("--grpc-target", default="", env_var="LOCUST_GRPC_TARGET", help="host:port")


def _option(environment: Environment, name: str, default: Any) -> Any:
    options = environment.parsed_options
    return getattr(options, name, default) if options is not None else default


class _FerryHttpUser(FastHttpUser):
    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        env = self.environment
        self.prompt: str = _option(env, "prompt", DEFAULT_PROMPT)
        self.max_new_tokens: int = _option(env, "max_new_tokens", 10)
        self.model_name: str = _option(env, "model_name", "opt-125m")

    def post_json(self, path: str, body: dict[str, Any], name: str | None = None) -> None:
        with self.client.post(path, json=body, name=name or path, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                data = response.json()
            except ValueError:
                response.failure("response is not JSON")
                return
            problem = self.check(data)
            if problem:
                response.failure(problem)

    def check(self, data: Any) -> str | None:
        return None


class GenerateUser(_FerryHttpUser):
    """The write-up's scenario: POST /generate {"text": ..., "max_new_tokens": 10}."""

    @task
    def generate(self) -> None:
        self.post_json("/generate", {"text": self.prompt, "max_new_tokens": self.max_new_tokens, "ignore_eos": True})

    def check(self, data: Any) -> str | None:
        if not isinstance(data, dict) or "generated_text" not in data:
            return "no generated_text in the answer"
        return None


class MixedGenerateUser(GenerateUser):
    """80 % short generations, 20 % long ones (--long-fraction, --long-max-new-tokens)."""

    def on_start(self) -> None:
        super().on_start()
        self.long_tokens: int = _option(self.environment, "long_max_new_tokens", 100)
        self.long_fraction: float = _option(self.environment, "long_fraction", 0.2)

    @task
    def generate(self) -> None:
        if random.random() < self.long_fraction:
            body = {"text": self.prompt, "max_new_tokens": self.long_tokens, "ignore_eos": True}
            self.post_json("/generate", body, name="/generate [long]")
        else:
            body = {"text": self.prompt, "max_new_tokens": self.max_new_tokens, "ignore_eos": True}
            self.post_json("/generate", body, name="/generate [short]")


class V1User(_FerryHttpUser):
    """KServe V1: {"instances": [{"text": ..., "max_new_tokens": n}]}."""

    @task
    def predict(self) -> None:
        body = {"instances": [{"text": self.prompt, "max_new_tokens": self.max_new_tokens, "ignore_eos": True}]}
        self.post_json(f"/v1/models/{self.model_name}:predict", body, name="/v1/models/:predict")

    def check(self, data: Any) -> str | None:
        if not isinstance(data, dict) or len(data.get("predictions") or []) != 1:
            return "expected one prediction"
        return None


def v2_body(prompt: str, max_new_tokens: int) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": [prompt]},
            {"name": "max_new_tokens", "shape": [1], "datatype": "INT32", "data": [max_new_tokens]},
        ],
        "parameters": {"ignore_eos": True},
    }


class V2RestUser(_FerryHttpUser):
    """Open Inference Protocol over REST."""

    @task
    def infer(self) -> None:
        body = v2_body(self.prompt, self.max_new_tokens)
        self.post_json(f"/v2/models/{self.model_name}/infer", body, name="/v2/models/infer")

    def check(self, data: Any) -> str | None:
        outputs = (
            {o.get("name") for o in data.get("outputs", [])} if isinstance(data, dict) else set()
        )
        return None if "generated_text" in outputs else "no generated_text output"


class OpenAICompletionsUser(_FerryHttpUser):
    """OpenAI completions: {"model", "prompt", "max_tokens"} -> choices[0].text."""

    @task
    def complete(self) -> None:
        body = {
            "model": self.model_name,
            "prompt": self.prompt,
            "max_tokens": self.max_new_tokens,
            "ignore_eos": True,
        }
        self.post_json("/openai/v1/completions", body)

    def check(self, data: Any) -> str | None:
        if not isinstance(data, dict) or not data.get("choices"):
            return "no choices in the answer"
        return None


def _one_element(pb: Any, name: str, datatype: str, contents: Any) -> Any:
    """A V2 input tensor of shape [1]."""
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[1], contents=contents)


class V2GrpcUser(User):
    """Open Inference Protocol over gRPC (KServe's generated stubs), timed as locust requests."""

    abstract = False
    wait_time = constant(0)

    def on_start(self) -> None:
        import grpc

        _init_grpc_for_gevent()
        pb = _messages()
        env = self.environment
        target = _option(env, "grpc_target", "") or self._default_target()
        self.pb = pb
        self.channel = grpc.insecure_channel(target)
        self.model_infer = self.channel.unary_unary(
            MODEL_INFER,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        self.model_name = _option(env, "model_name", "opt-125m")
        prompt = _option(env, "prompt", DEFAULT_PROMPT)
        tokens = _option(env, "max_new_tokens", 10)
        text = _one_element(pb, "text", "BYTES", pb.InferTensorContents(bytes_contents=[prompt.encode()]))
        max_new_tokens = _one_element(pb, "max_new_tokens", "INT32", pb.InferTensorContents(int_contents=[tokens]))
        self.request = pb.ModelInferRequest(
            model_name=self.model_name,
            inputs=[text, max_new_tokens],
            parameters={"ignore_eos": pb.InferParameter(bool_param=True)},
        )

    def _default_target(self) -> str:
        parsed = urlparse(self.host or "http://127.0.0.1:8080")
        return f"{parsed.hostname or '127.0.0.1'}:8081"

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def infer(self) -> None:
        started = time.perf_counter()
        exception: BaseException | None = None
        length = 0
        try:
            response = self.model_infer(self.request, timeout=60)
            length = response.ByteSize()
            if not any(o.name == "generated_text" for o in response.outputs):
                exception = RuntimeError("no generated_text output")
        except Exception as exc:  # a gRPC error is a failed request, not a crash
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name="ModelInfer",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )


USER_CLASSES = [
    GenerateUser,
    MixedGenerateUser,
    V1User,
    V2RestUser,
    V2GrpcUser,
    OpenAICompletionsUser,
]

if __name__ == "__main__":
    print(json.dumps([cls.__name__ for cls in USER_CLASSES]))
