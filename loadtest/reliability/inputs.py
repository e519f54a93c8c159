"""inputs: one request of each hostile input class (credentials, control routes, huge or
countless headers, chunked bodies over the limit, 1 MB prompts, V2 binary-data extension, gRPC
parameter kinds and a 7 MB message, sampling extremes, log injection) against the tiny
CTranslate2 model with an API key: each answered its 4xx, zero 5xx, no traceback or forged line
in the log."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loadtest import hostile
from loadtest.reliability.options import Options
from loadtest.reliability.results import ScenarioResult
from loadtest.reliability.servers import MODEL_NAME, running

API_KEY = "reliability-" + "k" * 20
MAX_BODY = 1_048_576


def _judge(res: ScenarioResult) -> None:
    f = res.figures
    res.check(
        "every input class answered as expected",
        not f["unexpected"],
        f"{f['classes']} classes; unexpected: {f['unexpected'] or 'none'}",
    )
    res.check("zero 5xx", f["server_errors"] == 0, f"{f['server_errors']} 5xx / INTERNAL answers")
    res.check(
        "limits before work",
        f["probe_max_ms_during_1mb_prompts"] < 150 and f["grpc_7mb_refused_s"] < 1.5,
        f"liveness probe <= {f['probe_max_ms_during_1mb_prompts']:.1f} ms during the 1 MB prompts;"
        f" 7 MB gRPC prompt refused in {f['grpc_7mb_refused_s']} s",
    )
    res.check(
        "clean logs",
        not f["traceback_in_log"] and not f["forged_line_in_log"] and f["900kb_field_answer_bytes"] < 2000,
        f"traceback in log: {f['traceback_in_log']}, forged line: {f['forged_line_in_log']},"
        f" answer to a 900 KB field name: {f['900kb_field_answer_bytes']} bytes",
    )


async def inputs(opts: Options, log_dir: Path) -> ScenarioResult:
    """One request of each hostile input class: the expected 4xx, never a 5xx."""
    settings = {"model_dir": opts.inputs_model_dir, "api_key": API_KEY, "max_body_bytes": MAX_BODY}
    async with running("inputs", log_dir, settings) as server:
        figures = await asyncio.to_thread(
            hostile.input_classes, server, key=API_KEY, model=MODEL_NAME, grpc_target=server.grpc_target,
            max_body_bytes=MAX_BODY,
        )  # fmt: skip
    res = ScenarioResult("inputs", figures=figures)
    _judge(res)
    return res
