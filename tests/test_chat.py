"""Chat completions through the official `openai` client against the real ModelServer on
127.0.0.1 (tiny CTranslate2 model): plain and streamed, token limits, stop, sampling, errors in
OpenAI's shape, the chat template (default, inline, file, sandboxed) and /v1/models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from predictor.chat_template import DEFAULT_TEMPLATE, ChatTemplateError, load_chat_template
from predictor.tokenizer import shared_tokenizer
from tests.conftest import ROOT, FerryProcess
from tests.helpers import openai_client, serving, streamed

TOKENIZER = shared_tokenizer()
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is your name, dog?"},
]
RENDERED = "You are a helpful assistant.\n\nUser: What is your name, dog?\nAssistant:"


@pytest.fixture(scope="module")
def client(ferry: FerryProcess) -> openai.OpenAI:
    return openai_client(ferry)


# ---- the template ------------------------------------------------------------------------


def test_default_template_writes_a_transcript() -> None:
    template = load_chat_template("")
    assert template.source == "default" and template.text == DEFAULT_TEMPLATE
    assert template.render(MESSAGES) == RENDERED
    multi = [*MESSAGES, {"role": "assistant", "content": "Rex."}, {"role": "user", "content": "Sure?"}]
    assert template.render(multi) == RENDERED + " Rex.\nUser: Sure?\nAssistant:"


def test_template_from_a_string_or_a_file(tmp_path: Path) -> None:
    inline = load_chat_template("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert inline.source == "inline"
    assert inline.render(MESSAGES[1:]) == "<user>What is your name, dog?"
    path = tmp_path / "chat.jinja"
    path.write_text("{{ bos_token }}{{ messages[-1]['content'] }}")
    from_file = load_chat_template(str(path))
    assert from_file.source == str(path)
    assert from_file.render(MESSAGES, bos_token="</s>") == "</s>What is your name, dog?"


def test_template_is_sandboxed_and_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        load_chat_template("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="cannot read"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    escape = load_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        escape.render(MESSAGES)
    mutate = load_chat_template("{{ messages.append(1) }}")
    with pytest.raises(ChatTemplateError):
        mutate.render(MESSAGES)
    refuse = load_chat_template("{{ raise_exception('only user messages') }}")
    with pytest.raises(ChatTemplateError, match="only user messages"):
        refuse.render(MESSAGES)


def test_invalid_template_setting_stops_start_up() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from predictor.settings import load_settings; load_settings(engine='simulated', "
         "chat_template='{% if %}')"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "chat_template" in result.stderr and "does not compile" in result.stderr


# ---- the route ---------------------------------------------------------------------------


def test_models_show_the_template(client: openai.OpenAI, ferry: FerryProcess) -> None:
    card = httpx.get(f"{ferry.url}/openai/v1/models/{ferry.model_name}", timeout=10).json()
    assert card["chat_template"]["source"] == "default"
    assert card["chat_template"]["template"] == DEFAULT_TEMPLATE
    listed = client.models.list().data[0]
    assert listed.model_extra is not None and listed.model_extra["chat_template"]["source"] == "default"


def test_chat_plain_equals_the_completion_of_the_rendered_prompt(client: openai.OpenAI, ferry: FerryProcess) -> None:
    chat = client.chat.completions.create(model=ferry.model_name, messages=MESSAGES, max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    (choice,) = chat.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    completion = client.completions.create(model=ferry.model_name, prompt=RENDERED, max_tokens=8, temperature=0)
    assert choice.message.content == completion.choices[0].text
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (TOKENIZER.count(RENDERED), 8)


def test_chat_streamed_text_equals_plain(client: openai.OpenAI, ferry: FerryProcess) -> None:
    plain = client.chat.completions.create(model=ferry.model_name, messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = streamed(
        client.chat.completions.create,
        model=ferry.model_name,
        messages=MESSAGES,
        max_completion_tokens=20,
        temperature=0,
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 10  # token by token
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stop_and_token_limits(client: openai.OpenAI, ferry: FerryProcess) -> None:
    full = client.chat.completions.create(model=ferry.model_name, messages=MESSAGES, max_tokens=16, temperature=0)
    text = full.choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(
        model=ferry.model_name, messages=MESSAGES, max_tokens=16, temperature=0, stop=stop
    )
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # max_completion_tokens wins over the deprecated max_tokens.
    both = client.chat.completions.create(
        model=ferry.model_name, messages=MESSAGES, max_tokens=16, max_completion_tokens=3, temperature=0
    )
    assert both.usage is not None and both.usage.completion_tokens == 3


def test_chat_sampling_and_text_parts(client: openai.OpenAI, ferry: FerryProcess) -> None:
    sampled = client.chat.completions.create(
        model=ferry.model_name,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0.8,
        top_p=0.9,
        seed=3,
        extra_body={"top_k": 20, "ignore_eos": True},
    )
    assert sampled.usage is not None and sampled.usage.completion_tokens == 5
    pieces = [{"type": "text", "text": "What is your "}, {"type": "text", "text": "name, dog?"}]
    parts = [{"role": "user", "content": pieces}]
    as_parts = client.chat.completions.create(model=ferry.model_name, messages=parts, max_tokens=4, temperature=0)
    whole = [{"role": "user", "content": "What is your name, dog?"}]
    as_text = client.chat.completions.create(model=ferry.model_name, messages=whole, max_tokens=4, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


BAD: list[tuple[dict[str, Any], str]] = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
    ({"n": 2}, "n"),
    ({"logprobs": True, "stream": True}, "logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"extra_body": {"tools_please": 1}}, "tools_please"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
]


@pytest.mark.parametrize(("override", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_chat_requests_are_400_in_openai_shape(
    client: openai.OpenAI, ferry: FerryProcess, override: dict[str, Any], param: str
) -> None:
    kwargs: dict[str, Any] = {"model": ferry.model_name, "messages": MESSAGES, "max_tokens": 4, **override}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**kwargs)
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    assert body["param"] == param or body["param"].startswith(param + ".")


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "model_not_found"


def test_a_custom_template_is_used_and_shown(tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with serving(tmp_path, chat_template=str(template)) as server:
        client = openai_client(server)
        card = httpx.get(f"{server.url}/openai/v1/models", timeout=10).json()["data"][0]
        assert card["chat_template"]["source"] == str(template)
        chat = client.chat.completions.create(
            model=server.model_name, messages=MESSAGES[1:], max_tokens=6, temperature=0
        )
        prompt = "What is your name, dog?\n"
        plain = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=6, temperature=0)
        assert chat.choices[0].message.content == plain.choices[0].text
        assert chat.usage is not None and chat.usage.prompt_tokens == TOKENIZER.count(prompt)
