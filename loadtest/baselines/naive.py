"""The write-up's starting point: FastAPI, one engine call per request, made right on the event
loop. While the engine works nothing else runs, so requests are served strictly one at a time
(batch size 1), however many users wait.

`python -m loadtest.baselines.naive --port 8090 --inter-threads 2 --intra-threads 1`
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from loadtest.baselines.common import (
    Stats,
    add_common_routes,
    answer,
    build_engine,
    parse_generate,
    parser,
    run_batch,
    serve,
)
from predictor.engine import Engine


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="naive baseline")
    stats = Stats()
    add_common_routes(app, stats)

    @app.post("/generate")
    async def generate(request: Request) -> dict[str, object]:
        item = parse_generate(engine, await request.json())
        (output,) = run_batch(engine, [item])  # blocks the event loop: the naive design
        stats.record(1)
        return answer(output)

    return app


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    serve(create_app(build_engine(args)), args)


if __name__ == "__main__":
    main()
