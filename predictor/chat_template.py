"""Chat templates: OpenAI chat messages -> one prompt, through Jinja2 in a sandbox.

The `chat_template` setting is a file path, a template string, or empty for ferry's plain
default for base models (OPT-125m was never tuned for chat: the default writes a transcript,
"User: ...\\nAssistant:", which a base model continues). Templates follow the Hugging Face
convention: `messages` (each with `role` and `content`), `add_generation_prompt`, `bos_token`,
`eos_token` and `raise_exception(message)`; they render in Jinja2's immutable sandbox, so a
template cannot reach Python internals or change its inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template does not compile, or a request's messages made it fail."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # "default", "inline" or the file's path
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """What /v1/models says about the template in use."""
        return {"source": self.source, "sha256": self.sha256, "template": self.text}

    def render(self, messages: list[dict[str, Any]], *, bos_token: str = "", eos_token: str = "") -> str:
        try:
            return str(
                _compile(self.text).render(
                    messages=messages,
                    add_generation_prompt=True,
                    bos_token=bos_token,
                    eos_token=eos_token,
                )
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ChatTemplateError(f"the chat template failed on these messages: {exc}") from None


@cache
def _compile(text: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise
    return env.from_string(text)


@cache
def load_chat_template(setting: str) -> ChatTemplate:
    """The setting's template: a readable file, a template string, or the default when empty.
    Raises ChatTemplateError when it does not compile."""
    value = setting.strip()
    if not value:
        template = ChatTemplate("default", DEFAULT_TEMPLATE)
    elif "{" not in value and ("/" in value or value.endswith((".jinja", ".j2", ".txt"))):
        path = Path(value)
        try:
            template = ChatTemplate(str(path), path.read_text())
        except OSError as exc:
            raise ChatTemplateError(f"cannot read the chat template file {value}: {exc.strerror}") from None
    else:
        template = ChatTemplate("inline", setting)
    try:
        _compile(template.text)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None
    return template
