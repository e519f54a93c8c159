"""The old name of loadtest/harness.py, kept while loadtest/reliability and loadtest/hostile still
import from it: every name here is harness's own object."""

from loadtest.harness import (
    HOST,
    ROOT,
    Server,
    free_port,
    free_ports,
    http_get,
    start_baseline,
    start_ferry,
    start_kserve_floor,
    start_server,
)

__all__ = [
    "HOST",
    "ROOT",
    "Server",
    "free_port",
    "free_ports",
    "http_get",
    "start_baseline",
    "start_ferry",
    "start_kserve_floor",
    "start_server",
]
