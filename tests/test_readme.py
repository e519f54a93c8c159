"""The README is the user's first page: it must stay true to the code."""

from __future__ import annotations

import re

from predictor.settings import Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_two_setup_commands_come_first() -> None:
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "serve"], ["make", "test"]]


def test_every_setting_is_in_the_settings_table() -> None:
    documented = set(re.findall(r"^\| `FERRY_([A-Z0-9_]+)`", README, flags=re.M))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_every_route_has_a_curl() -> None:
    for route in ("/generate", ":predict", "/infer", "/openai/v1/completions", "/metrics"):
        assert re.search(rf"curl [^\n]*{re.escape(route)}", README), route
