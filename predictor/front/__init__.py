"""ferry's HTTP front: an ASGI app in front of KServe's FastAPI app.

The hot routes (`POST /generate`, V1 `:predict`, OpenAI completions) are served here with no
middleware chain or dependency solving; everything else (V2 REST, metadata, health, metrics,
KServe's own routes) goes on to FastAPI. Both get the same body-size limit and the same
disconnect handling: a request whose client goes away is cancelled, with no extra task.
"""

from predictor.front.app import Front, Route

__all__ = ["Front", "Route"]
