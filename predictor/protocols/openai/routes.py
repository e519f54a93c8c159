"""OpenAI routes: POST completions (served by ferry's HTTP front, see `predictor.front`) and
the model list (on KServe's FastAPI app)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.responses import JSONResponse

from predictor.batcher import GenerationRequest
from predictor.engine import EngineOutput
from predictor.protocols.openai.chat import template_card
from predictor.protocols.openai.logprobs import completion_logprobs, gather_scores
from predictor.protocols.openai.responses import Envelope, error_status_and_body
from predictor.protocols.openai.schema import CompletionRequest, model_not_found, read_request
from predictor.protocols.openai.serving import Completion, CompletionStream, choice
from predictor.protocols.requests import build_request, check_count, check_max_new_tokens, check_text, off_loop

if TYPE_CHECKING:
    from predictor.model import FerryModel


def _default_prefix() -> str:
    prefix = os.environ.get("KSERVE_OPENAI_ROUTE_PREFIX", "/openai").strip()
    return "/" + prefix.strip("/") if prefix.strip("/") else ""


DEFAULT_PREFIX = _default_prefix()


def model_card(model: FerryModel) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": 0,
        "owned_by": "ferry",
        "chat_template": template_card(model),  # which template chat completions use
    }


def register_model_routes(app: FastAPI, model: FerryModel, prefix: str = DEFAULT_PREFIX) -> None:
    @app.get(f"{prefix}/v1/models", response_model=None)
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(model)]})

    @app.get(f"{prefix}/v1/models/{{model_id:path}}", response_model=None)
    async def retrieve_model(model_id: str) -> JSONResponse:
        if model_id != model.name:
            status, body = error_status_and_body(model_not_found(model_id))
            return JSONResponse(body, status_code=status)
        return JSONResponse(model_card(model))


async def completions(model: FerryModel, raw_body: bytes) -> dict[str, Any] | CompletionStream:
    """POST /v1/completions: the JSON answer, or the event stream the caller then sends."""
    model.check_accepting()
    body = read_request(raw_body, CompletionRequest, model.name)
    limits = model.limits
    prompts = body.prompts
    check_count(len(prompts), "prompt", limits)
    # echo + max_tokens 0: score the prompt, generate nothing (how evaluation harnesses ask).
    scoring_only = body.echo and body.max_tokens == 0
    max_tokens = 0 if scoring_only else check_max_new_tokens(body.max_tokens, "max_tokens", limits)
    sampling = body.sampling()

    def build() -> list[GenerationRequest]:
        built = []
        for i, text in enumerate(prompts):
            field = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            built.append(
                build_request(
                    model.inference_engine,
                    check_text(text, field),
                    max_tokens,
                    limits,
                    field=field,
                    sampling=sampling,
                    incremental=body.stream,
                    stop=body.stops,
                    ignore_eos=body.ignore_eos,
                )
            )
        return built

    requests = await off_loop(len(raw_body), build)  # long prompts are tokenised off the loop
    envelope = Envelope(model.name)
    if not body.stream:
        outputs = [EngineOutput("") for _ in requests] if scoring_only else await model.generate(requests)
        choices = [choice(i, r, o) for i, (r, o) in enumerate(zip(requests, outputs, strict=True))]
        if body.logprobs is not None:
            scores = await gather_scores(
                model, [r.prompt_tokens for r in requests], [o.tokens for o in outputs], body.logprobs
            )
            for c, r, o, scored in zip(choices, requests, outputs, scores, strict=True):
                c.logprobs = completion_logprobs(
                    r.prompt_tokens, o.tokens, scored, echo=body.echo, decode=model.batcher.decode
                )
        if body.echo:
            for c, prompt in zip(choices, prompts, strict=True):
                c.text = prompt + c.text
        return envelope.completion(choices)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return CompletionStream(Completion(model.batcher, requests), envelope, include_usage)
