"""wrk, the light load generator (a C event loop: about a tenth of a core at GPU-class rates on
the same machine), for the figures where the generator must not be the bottleneck."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
"""
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass
class WrkResult:
    users: int
    rps: float
    p50_s: float
    p99_s: float
    requests: int
    non_2xx: int


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"wrk latency {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def parse(output: str, users: int) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    # The latency distribution's own lines (a "+/- Stdev" column can end in "50%" too).
    p50 = _seconds(re.search(r"^\s+50%\s+(\S+)$", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"^\s+99%\s+(\S+)$", output, re.M).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    return WrkResult(users, rps, p50, p99, requests, int(bad.group(1)) if bad else 0)


def run(url: str, body: bytes, *, users: int, duration_s: float, warmup_s: float = 2.0) -> WrkResult:
    """A closed loop of `users` connections POSTing `body`; bounded by `duration_s`."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk not found (`make system-deps` installs Debian's wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(body=_lua_string(body.decode())))
    try:
        base = [wrk, "-t1", f"-c{users}", "-s", script.name]
        if warmup_s > 0:
            subprocess.run([*base, f"-d{warmup_s:g}s", url], capture_output=True, check=True, timeout=warmup_s + 30)
        out = subprocess.run(
            [*base, f"-d{duration_s:g}s", "--latency", url],
            capture_output=True,
            text=True,
            check=True,
            timeout=duration_s + 30,
        )
    finally:
        Path(script.name).unlink(missing_ok=True)
    return parse(out.stdout, users)


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
