"""Every ferry_* metric, defined once (prometheus-client conventions: base units, _total counters,
closed label sets). KServe's own request_*_seconds histograms live in its own registry entries
and are kept as they are.

ferry runs one ModelServer worker per pod (the engine and batcher live in the process), so the
default in-process registry is exact; it scales by pods, not by uvicorn workers. KServe's
workers > 1 would pickle the model into child processes, each with its own engine, queue and
metrics, and prometheus-client's multiprocess mode cannot express per-process gauges such as
queue depth as one pod-level value without choosing an aggregation for each; one worker per pod
keeps every gauge exact and lets Kubernetes (KPA/KEDA/HPA) do the scaling.

Labelled counters are initialised to zero for every value of their closed label sets, so that
`rate()` of an outcome that has not happened yet is 0 rather than "no data" (dashboards show 0,
ratio alerts stay evaluable, and "no traffic" can be told from "not scraped"). `_created`
series are switched off: Prometheus would store them as extra gauges nobody queries.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info, disable_created_metrics

disable_created_metrics()

# Closed label values (documented in the README).
PROTOCOLS = ("v1", "v2", "grpc", "generate", "openai")
OUTCOMES = ("ok", "client_error", "rejected", "timeout", "cancelled", "error")
REJECT_REASONS = ("queue_full", "draining", "unavailable")
STAGES = ("queued", "running")
# How a generation request ended: its token count (length), a stop string (stop), the model's
# end token (eos), its client gone (cancelled), or a failure (error: engine, deadline, shutdown).
FINISH_REASONS = ("length", "stop", "eos", "cancelled", "error")

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    7.5, 10.0, 20.0, 30.0, 60.0,
)
ENGINE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
    1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TOKEN_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 0.75, 1.0, 2.5,
)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Integer buckets: every size up to 64 (so the sizes formed are known exactly, which the
    benchmark's ceiling replays), then a doubling ladder, and the max batch size itself."""
    edges = {float(n) for n in range(1, min(max_batch_size, 64) + 1)}
    n = 128
    while n < max_batch_size:
        edges.add(float(n))
        n *= 2
    edges.add(float(max_batch_size))
    return tuple(sorted(edges))


REQUESTS = Counter(
    "ferry_requests",
    "Inference requests answered, by protocol and outcome (one per HTTP/gRPC call).",
    ["protocol", "outcome"],
)
REJECTED = Counter(
    "ferry_requests_rejected",
    "Generation requests refused without computing them, by reason.",
    ["reason"],
)
TIMEOUTS = Counter(
    "ferry_requests_timed_out",
    "Generation requests whose deadline passed, by where they were (queued or running).",
    ["stage"],
)
CANCELLED = Counter(
    "ferry_requests_cancelled",
    "Generation requests abandoned by their client, by where they were (queued or running).",
    ["stage"],
)
ENGINE_FAILURES = Counter("ferry_engine_failures", "Engine calls (batches) that raised an error.")
QUEUE_DEPTH = Gauge("ferry_queue_depth", "Generation requests waiting for an engine slot.")
QUEUE_CAPACITY = Gauge(
    "ferry_queue_capacity", "Most generation requests the queue admits (max_queue_size)."
)
IN_FLIGHT = Gauge("ferry_requests_in_flight", "Generation requests admitted and not yet answered.")
SLOTS_BUSY = Gauge("ferry_engine_slots_busy", "Engine slots running a batch now.")
SLOTS_TOTAL = Gauge("ferry_engine_slots", "Engine slots (batches that can run at once).")
QUEUE_SECONDS = Histogram(
    "ferry_queue_wait_seconds",
    "Time a generation request waited in the queue before its batch started.",
    buckets=LATENCY_BUCKETS,
)
ENGINE_SECONDS = Histogram(
    "ferry_batch_duration_seconds",
    "Engine time per batch, from dispatch to its last sequence.",
    buckets=ENGINE_BUCKETS,
)
REQUEST_SECONDS = Histogram(
    "ferry_request_duration_seconds",
    "End-to-end time of a generation request inside ferry, by protocol.",
    ["protocol"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "ferry_time_to_first_token_seconds",
    "Time from admission to the first generated token of a streamed request.",
    buckets=LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("ferry_prompt_tokens", "Prompt tokens of computed requests.")
GENERATED_TOKENS = Counter(
    "ferry_generated_tokens", "Tokens the engine generated (every computed request, cancelled ones included)."
)
BATCH_TOKENS = Histogram(
    "ferry_batch_generated_tokens",
    "Tokens generated per batch (engine call).",
    buckets=TOKEN_BUCKETS,
)
# ---- per request, by model (vLLM's convention: model_name on every per-request series) ----
REQUEST_PROMPT_TOKENS = Histogram(
    "ferry_request_prompt_tokens",
    "Prompt tokens per finished generation request.",
    ["model_name"],
    buckets=TOKEN_BUCKETS,
)
REQUEST_GENERATION_TOKENS = Histogram(
    "ferry_request_generation_tokens",
    "Tokens generated per finished generation request (the end token counted when it ended one).",
    ["model_name"],
    buckets=TOKEN_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "ferry_time_per_output_token_seconds",
    "Per finished generation request: time from its first dispatch to its last token, divided by "
    "its generated tokens.",
    ["model_name"],
    buckets=TOKEN_LATENCY_BUCKETS,
)
INTER_TOKEN_SECONDS = Histogram(
    "ferry_inter_token_latency_seconds",
    "Time between consecutive decoding steps of a batch decoded step by step (streams, mixed "
    "lengths, stop strings): the gap between two tokens of each of its sequences.",
    ["model_name"],
    buckets=TOKEN_LATENCY_BUCKETS,
)
REQUESTS_FINISHED = Counter(
    "ferry_requests_finished",
    "Generation requests by how they ended: length, stop (stop string), eos (the model's end "
    "token), cancelled (client gone), error.",
    ["model_name", "finish_reason"],
)
MODEL_INFO = Info(
    "ferry_model",
    "The model being served (always 1): name, kind (converted/random/tiny/simulated), "
    "device, compute type.",
)


class RequestSeries:
    """One model's per-request series, looked up once (labels() takes a lock and builds a key);
    every finish reason exists from start-up with the value 0."""

    __slots__ = ("finished", "generation_tokens", "inter_token", "prompt_tokens", "time_per_output_token")

    def __init__(self, model_name: str) -> None:
        self.prompt_tokens = REQUEST_PROMPT_TOKENS.labels(model_name)
        self.generation_tokens = REQUEST_GENERATION_TOKENS.labels(model_name)
        self.time_per_output_token = TIME_PER_OUTPUT_TOKEN.labels(model_name)
        self.inter_token = INTER_TOKEN_SECONDS.labels(model_name)
        self.finished = {reason: REQUESTS_FINISHED.labels(model_name, reason) for reason in FINISH_REASONS}


def _initialise_label_sets() -> None:
    """Every closed label combination exists from start-up with the value 0."""
    for protocol in PROTOCOLS:
        for outcome in OUTCOMES:
            REQUESTS.labels(protocol, outcome)
    for reason in REJECT_REASONS:
        REJECTED.labels(reason)
    for stage in STAGES:
        TIMEOUTS.labels(stage)
        CANCELLED.labels(stage)


_initialise_label_sets()

_batch_size: Histogram | None = None


def batch_size_histogram(max_batch_size: int) -> Histogram:
    """Created once, with buckets fitted to the configured max batch size."""
    global _batch_size
    if _batch_size is None:
        _batch_size = Histogram(
            "ferry_batch_size",
            "Requests per engine call (batch); buckets are integers up to max_batch_size.",
            buckets=batch_size_buckets(max_batch_size),
        )
    return _batch_size
