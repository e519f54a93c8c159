"""A scenario's figures and pass/fail criteria; each verdict is logged as it is reached."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def log(message: str) -> None:
    print(f"[reliability {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Criterion:
    name: str
    ok: bool
    detail: str


@dataclass
class ScenarioResult:
    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    criteria: list[Criterion] = field(default_factory=list)
    error: str | None = None

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.criteria.append(Criterion(name, bool(ok), detail))
        log(f"{self.name}: {'PASS' if ok else 'FAIL'} {name}: {detail}")

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.criteria) and all(c.ok for c in self.criteria)
