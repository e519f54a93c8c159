"""The write-up's starting point: FastAPI, one engine call per request, made right on the event
loop. While the engine works nothing else runs, so requests are served strictly one at a time
(batch size 1), however many users wait.

`python -m loadtest.baselines.naive --port 8090 --inter-threads 2 --intra-threads 1`
"""

from __future__ import annotations

from fastapi import FastAPI

from loadtest.baselines import common
from predictor.engine import Engine, EngineItem, EngineOutput


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="naive baseline")
    stats = common.Stats()

    async def compute(item: EngineItem) -> EngineOutput:
        (output,) = common.run_batch(engine, [item])  # blocks the event loop: the naive design
        stats.record(1)
        return output

    common.add_routes(app, engine, stats, compute)
    return app


if __name__ == "__main__":
    common.main(__doc__ or "", create_app, default_port=8090)
