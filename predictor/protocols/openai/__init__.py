"""OpenAI-compatible completions on ferry's own batcher (KServe's own OpenAI layer imports vllm).

    POST {prefix}/v1/completions     text completions, plain or streamed (server-sent events)
    POST {prefix}/v1/chat/completions  chat completions through the chat template, plain or streamed
    GET  {prefix}/v1/models          the served model (and GET {prefix}/v1/models/{id})

`prefix` follows KServe's `KSERVE_OPENAI_ROUTE_PREFIX` convention (default `/openai`).
Modules: `schema` (request and client errors), `responses` (bodies, SSE chunks, error bodies),
`serving` (prompts through the batcher), `routes` (the handlers).
"""

from predictor.protocols.openai.chat import ChatEnvelope, chat_completions, parse_chat
from predictor.protocols.openai.responses import ChoiceResult, Envelope, error_status_and_body
from predictor.protocols.openai.routes import DEFAULT_PREFIX, completions, model_card, register_model_routes
from predictor.protocols.openai.schema import CompletionRequest, OpenAIError, parse_completion
from predictor.protocols.openai.serving import Completion, CompletionStream

__all__ = [
    "DEFAULT_PREFIX",
    "ChatEnvelope",
    "ChoiceResult",
    "Completion",
    "CompletionRequest",
    "CompletionStream",
    "Envelope",
    "OpenAIError",
    "chat_completions",
    "completions",
    "error_status_and_body",
    "model_card",
    "parse_chat",
    "parse_completion",
    "register_model_routes",
]
