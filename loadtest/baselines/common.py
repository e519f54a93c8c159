"""What the baselines share: the entry point and flags, the engine (predictor's own classes, so the
computation is identical to ferry's), the /generate route and body, and a /stats route for the
benchmark."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request

from predictor.engine import (
    GREEDY,
    Collect,
    CTranslate2Engine,
    Engine,
    EngineItem,
    EngineOutput,
    LatencyModel,
    SimulatedEngine,
)

MODEL_NAME = "opt-125m"
MAX_NEW_TOKENS_LIMIT = 256


def loopback_parser(description: str, default_port: int) -> argparse.ArgumentParser:
    """--host (127.0.0.1) and --port: every baseline is a loopback server."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=default_port)
    return p


def parser(description: str, default_port: int = 8090) -> argparse.ArgumentParser:
    """The engine baselines' flags: the same engine settings as ferry's."""
    p = loopback_parser(description, default_port)
    p.add_argument("--model-dir", type=Path, default=Path("models/opt-125m"))
    p.add_argument("--engine", choices=["ctranslate2", "simulated"], default="ctranslate2")
    p.add_argument("--compute-type", default="auto")
    p.add_argument("--inter-threads", type=int, default=1)
    p.add_argument("--intra-threads", type=int, default=None)
    return p


def build_engine(args: argparse.Namespace) -> Engine:
    if args.engine == "simulated":
        return SimulatedEngine(name=MODEL_NAME, latency=LatencyModel())
    return CTranslate2Engine(
        args.model_dir,
        name=MODEL_NAME,
        compute_type=args.compute_type,
        inter_threads=args.inter_threads,
        intra_threads=args.intra_threads,
    )


def run_batch(engine: Engine, items: Sequence[EngineItem]) -> list[EngineOutput]:
    """One blocking engine call; greedy, like the write-up's requests."""
    listener = Collect(len(items))
    engine.generate(items, GREEDY, listener)
    return [o if o is not None else EngineOutput("") for o in listener.outputs]


def parse_generate(engine: Engine, payload: Any) -> EngineItem:
    """The write-up's body: {"text": ..., "max_new_tokens": 10}."""
    if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
        raise HTTPException(422, 'body must be {"text": str, "max_new_tokens": int}')
    tokens = payload.get("max_new_tokens", 16)
    if not isinstance(tokens, int) or not 1 <= tokens <= MAX_NEW_TOKENS_LIMIT:
        raise HTTPException(422, f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS_LIMIT}")
    # ignore_eos as ferry reads it: the benchmark's body asks for exactly max_new_tokens.
    return EngineItem(engine.tokenize(payload["text"]), tokens, ignore_eos=payload.get("ignore_eos") is True)


def answer(output: EngineOutput) -> dict[str, Any]:
    return {"generated_text": output.text, "generated_tokens": output.generated_tokens}


@dataclass
class Stats:
    batches: int = 0
    requests: int = 0
    sizes: list[int] = field(default_factory=list)

    def record(self, n: int) -> None:
        self.batches += 1
        self.requests += n
        if len(self.sizes) < 1_000_000:
            self.sizes.append(n)


Compute = Callable[[EngineItem], Awaitable[EngineOutput]]


def add_routes(app: FastAPI, engine: Engine, stats: Stats, compute: Compute) -> None:
    """POST /generate (the write-up's body, answered by `compute`), /health and /stats."""

    @app.post("/generate")
    async def generate(request: Request) -> dict[str, Any]:
        return answer(await compute(parse_generate(engine, await request.json())))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def get_stats() -> dict[str, Any]:
        return {"batches": stats.batches, "requests": stats.requests}


def main(description: str, create_app: Callable[[Engine], FastAPI], default_port: int) -> None:
    """A baseline's entry point: flags, engine, app, uvicorn on the loopback address."""
    import uvicorn

    args = parser(description, default_port).parse_args()
    app = create_app(build_engine(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
