"""Writes docs/settings.md from the Settings class (tests/test_readme.py keeps the two in sync).

    python -m tools.settings_doc > docs/settings.md
"""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticUndefined

from predictor.settings import Settings

HEADER = """# Settings

One pydantic-settings class (`predictor/settings.py`): environment variables with the `FERRY_`
prefix, or command-line flags layered on KServe's own parser (`--http_port`, `--grpc_port`,
`--model_name`, `--ssl_certfile` ... keep working). A flag beats the environment, which beats the
default. An invalid value stops start-up (exit 2) with a message naming the setting.

This page is generated from the class: `python -m tools.settings_doc > docs/settings.md`.

| environment | flag | default | what |
| --- | --- | --- | --- |
"""

SPECIAL_DEFAULTS = {"model_dir": "`/mnt/models` in a pod, else `models/opt-125m`"}


def _default(name: str, field: Any) -> str:
    if name in SPECIAL_DEFAULTS:
        return SPECIAL_DEFAULTS[name]
    default = field.default
    if default is PydanticUndefined or default is None:
        return "(none)"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    text = str(getattr(default, "get_secret_value", lambda: default)())
    return f"`{text}`" if text else "(empty)"


def render() -> str:
    rows = []
    for name, field in Settings.model_fields.items():
        flag = "`--model_name` (KServe's)" if name == "model_name" else f"`--{name.replace('_', '-')}`"
        what = (field.description or "").replace("|", "\\|")
        rows.append(f"| `FERRY_{name.upper()}` | {flag} | {_default(name, field)} | {what} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
