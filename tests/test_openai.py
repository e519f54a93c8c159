"""The OpenAI routes, through the official `openai` client against the real ModelServer on
127.0.0.1 (tiny CTranslate2 model), plus unit properties of the incremental detokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from predictor.batcher import DeadlineExceeded, GenerationRequest, QueueFull
from predictor.protocols.errors import OVERLOADED, ServingError
from predictor.protocols.openai import Completion, CompletionStream, Envelope, error_status_and_body
from predictor.text import TextAssembler
from predictor.tokenizer import gpt2_vocabulary, shared_tokenizer
from tests.conftest import REFERENCE_PROMPT, FerryProcess, scrape, wait_for_metric
from tests.fakes import WAIT_S, GatedEngine
from tests.helpers import INSTANT_ENGINE, occupy, openai_client, running_batcher, serving, streamed

TOKENIZER = shared_tokenizer()


@pytest.fixture(scope="module")
def client(ferry: FerryProcess) -> openai.OpenAI:
    return openai_client(ferry)


def streamed_texts(chunks: list[Any]) -> tuple[dict[int, str], dict[int, str | None]]:
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                assert choice.index not in finish, "a choice finished twice"
                finish[choice.index] = choice.finish_reason
    return texts, finish


# ---- the openai client against ferry ---------------------------------------------------


def test_models_list_and_retrieve(client: openai.OpenAI, ferry: FerryProcess) -> None:
    assert [m.id for m in client.models.list()] == [ferry.model_name]
    assert client.models.retrieve(ferry.model_name).owned_by == "ferry"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion(client: openai.OpenAI, ferry: FerryProcess) -> None:
    result = client.completions.create(
        model=ferry.model_name, prompt=REFERENCE_PROMPT, max_tokens=8, temperature=0
    )
    assert result.object == "text_completion"
    assert result.model == ferry.model_name
    assert result.id.startswith("cmpl-")
    (choice,) = result.choices
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert choice.text
    # The same engine path as /generate: greedy text is identical.
    plain = httpx.post(
        f"{ferry.url}/generate", json={"text": REFERENCE_PROMPT, "max_new_tokens": 8}, timeout=30
    )
    assert choice.text == plain.json()["generated_text"]
    # 9 BPE tokens + OPT's leading </s>; exactly max_tokens generated.
    assert result.usage is not None
    assert (
        result.usage.prompt_tokens,
        result.usage.completion_tokens,
        result.usage.total_tokens,
    ) == (10, 8, 18)


def test_list_prompt_one_choice_per_prompt(client: openai.OpenAI, ferry: FerryProcess) -> None:
    prompts = [REFERENCE_PROMPT, "The quick brown fox", "a"]
    result = client.completions.create(
        model=ferry.model_name, prompt=prompts, max_tokens=5, temperature=0
    )
    assert [c.index for c in result.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, result.choices, strict=True):
        alone = client.completions.create(
            model=ferry.model_name, prompt=prompt, max_tokens=5, temperature=0
        )
        assert choice.text == alone.choices[0].text
        assert choice.finish_reason == "length"
    assert result.usage is not None
    assert result.usage.prompt_tokens == sum(TOKENIZER.count(p) for p in prompts)
    assert result.usage.completion_tokens == 15
    assert result.usage.total_tokens == result.usage.prompt_tokens + 15


def test_stream_equals_plain_and_records_ttft(client: openai.OpenAI, ferry: FerryProcess) -> None:
    ttft_before = scrape(ferry)["ferry_time_to_first_token_seconds_count"]
    plain = client.completions.create(
        model=ferry.model_name, prompt=REFERENCE_PROMPT, max_tokens=24, temperature=0
    )
    chunks = streamed(
        client.completions.create, model=ferry.model_name, prompt=REFERENCE_PROMPT, max_tokens=24, temperature=0
    )
    texts, finish = streamed_texts(chunks)
    assert texts[0] == plain.choices[0].text
    assert finish == {0: "length"}
    # Token by token: every chunk before the finish carries new text, many of them.
    text_chunks = [c for c in chunks if c.choices and c.choices[0].text]
    assert len(text_chunks) >= 12
    # include_usage: the last chunk has no choices and the same usage as the plain answer.
    assert chunks[-1].choices == []
    assert chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id}
    ttft_after = scrape(ferry)["ferry_time_to_first_token_seconds_count"]
    assert ttft_after >= ttft_before + 1  # the streamed one (a plain answer has no first-token event)


def test_stream_list_prompt(client: openai.OpenAI, ferry: FerryProcess) -> None:
    prompts = ["first prompt", "second, longer prompt here", REFERENCE_PROMPT]
    plain = client.completions.create(
        model=ferry.model_name, prompt=prompts, max_tokens=10, temperature=0
    )
    chunks = list(
        client.completions.create(
            model=ferry.model_name, prompt=prompts, max_tokens=10, temperature=0, stream=True
        )
    )
    texts, finish = streamed_texts(chunks)
    assert texts == {c.index: c.text for c in plain.choices}
    assert finish == {0: "length", 1: "length", 2: "length"}


def test_stop_sequences_plain_and_streamed(client: openai.OpenAI, ferry: FerryProcess) -> None:
    full = client.completions.create(
        model=ferry.model_name, prompt=REFERENCE_PROMPT, max_tokens=16, temperature=0
    )
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    expected = text[: text.find(stop)]

    cut = client.completions.create(
        model=ferry.model_name,
        prompt=REFERENCE_PROMPT,
        max_tokens=16,
        temperature=0,
        stop=[stop, "never-seen"],
    )
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage is not None
    assert cut.usage.completion_tokens < 16  # generation stopped at the stop string

    chunks = list(
        client.completions.create(
            model=ferry.model_name,
            prompt=REFERENCE_PROMPT,
            max_tokens=16,
            temperature=0,
            stop=stop,
            stream=True,
        )
    )
    texts, finish = streamed_texts(chunks)
    assert texts[0] == expected
    assert finish == {0: "stop"}


def test_sampling_parameters_accepted(client: openai.OpenAI, ferry: FerryProcess) -> None:
    result = client.completions.create(
        model=ferry.model_name,
        prompt=[REFERENCE_PROMPT, "another"],
        max_tokens=6,
        temperature=0.9,
        top_p=0.95,
        seed=7,
        user="someone",
        extra_body={"top_k": 40},
    )
    assert [c.finish_reason for c in result.choices] == ["length", "length"]
    assert result.usage is not None and result.usage.completion_tokens == 12
    # top_k 1 is greedy whatever the temperature: the same text as temperature 0.
    greedy = [
        client.completions.create(
            model=ferry.model_name,
            prompt=REFERENCE_PROMPT,
            max_tokens=6,
            temperature=0.7,
            extra_body={"top_k": 1},
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    plain = client.completions.create(
        model=ferry.model_name, prompt=REFERENCE_PROMPT, max_tokens=6, temperature=0
    )
    assert greedy == [plain.choices[0].text] * 2


BAD_PARAMETERS: list[tuple[dict[str, Any], str]] = [
    ({"n": 2}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": 1, "stream": True}, "logprobs"),
    ({"echo": True, "stream": True}, "echo"),
    ({"suffix": "x"}, "suffix"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": "word " * 3000}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt[1]"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "n": 3}, "n"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"extra_body": {"top_k": "many"}}, "top_k"),
]


@pytest.mark.parametrize(("override", "param"), BAD_PARAMETERS, ids=[p for _, p in BAD_PARAMETERS])
def test_bad_parameters_are_400_in_openai_shape(
    client: openai.OpenAI, ferry: FerryProcess, override: dict[str, Any], param: str
) -> None:
    kwargs: dict[str, Any] = {
        "model": ferry.model_name,
        "prompt": "hello",
        "max_tokens": 4,
        **override,
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**kwargs)
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": caught.value.body["message"],  # type: ignore[index]
        "type": "invalid_request_error",
        "param": param,
        "code": None,
    }
    assert param.split("[")[0] in caught.value.message


def test_unknown_model_and_raw_error_shape(client: openai.OpenAI, ferry: FerryProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert caught.value.body == {
        "message": "The model `gpt-4` does not exist.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    raw = httpx.post(f"{ferry.url}/openai/v1/completions", content=b"{not json", timeout=10)
    assert raw.status_code == 400
    assert set(raw.json()) == {"error"}
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.post(f"{ferry.url}/openai/v1/completions", json={"prompt": "x"}, timeout=10)
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "model"


def test_server_errors_in_openai_shape() -> None:
    status, body = error_status_and_body(
        ServingError("server overloaded: the request queue is full", OVERLOADED, retry_after_s=2)
    )
    assert status == 503
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "overloaded"
    status, body = error_status_and_body(DeadlineExceeded(1.0, "running"))
    assert status == 504 and body["error"]["code"] == "timeout"
    status, body = error_status_and_body(QueueFull(4))
    assert status == 503 and body["error"]["code"] == "overloaded"


# ---- concurrency: disconnects, shared batches, overload (a server of its own) ------------


@pytest.fixture(scope="module")
def slow_ferry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerryProcess]:
    """One engine slot, a queue of 3, and long generations allowed (2,000 tokens: ~1 s)."""
    with serving(
        tmp_path_factory.mktemp("openai"), inter_threads=1, max_queue_size=3, max_new_tokens_limit=2048
    ) as server:
        yield server


LONG = 2000


@pytest.fixture(scope="module")
def steady_ferry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerryProcess]:
    """A simulated engine at 5 ms per token: 2,000 tokens take 10 s, so a client that leaves
    after the first chunk leaves long before its sequence could finish on its own."""
    steady = {**INSTANT_ENGINE, "sim_step_s": 0.005}
    with serving(tmp_path_factory.mktemp("openai-steady"), **steady, max_new_tokens_limit=2048) as server:
        yield server


def test_disconnect_mid_stream_stops_the_sequence(steady_ferry: FerryProcess) -> None:
    slow_ferry = steady_ferry
    client = openai_client(slow_ferry)
    before = scrape(slow_ferry)
    stream = client.completions.create(
        model=slow_ferry.model_name, prompt="Hello", max_tokens=LONG, temperature=0, stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].text
    stream.close()  # the client goes away after one token

    batches = "ferry_batch_duration_seconds_count"
    wait_for_metric(slow_ferry, batches, lambda v: v >= before[batches] + 1)
    outcome = 'ferry_requests_total{outcome="cancelled",protocol="openai"}'
    # The handler learns of the disconnect on its own schedule: wait for its record, not the batch's.
    wait_for_metric(slow_ferry, outcome, lambda v: v >= before.get(outcome, 0) + 1)
    wait_for_metric(slow_ferry, "ferry_requests_in_flight", lambda v: v == 0)
    after = scrape(slow_ferry)
    generated = after["ferry_generated_tokens_total"] - before["ferry_generated_tokens_total"]
    assert 1 <= generated < LONG, f"{generated} tokens generated for a client that left after one"
    key = 'ferry_requests_cancelled_total{stage="running"}'
    assert after[key] == before[key] + 1
    assert after[outcome] == before.get(outcome, 0) + 1
    assert after["ferry_requests_in_flight"] == 0


def test_streamed_and_plain_share_a_batch_and_overload_is_503(slow_ferry: FerryProcess) -> None:
    client = openai_client(slow_ferry)
    name = slow_ferry.model_name
    before = scrape(slow_ferry)
    # A occupies the only engine slot.
    blocker = client.completions.create(
        model=name, prompt="Hello", max_tokens=LONG, temperature=0, stream=True
    )
    next(iter(blocker))
    # B (streamed) and C, D (plain) wait in the queue: it is now full.
    streamed = client.completions.create(
        model=name, prompt=REFERENCE_PROMPT, max_tokens=8, temperature=0, stream=True
    )
    with ThreadPoolExecutor(2) as pool:
        plains = [
            pool.submit(
                client.completions.create,
                model=name,
                prompt=REFERENCE_PROMPT,
                max_tokens=8,
                temperature=0,
            )
            for _ in range(2)
        ]
        wait_for_metric(slow_ferry, "ferry_queue_depth", lambda v: v == 3)

        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(
                model=name, prompt="one too many", max_tokens=2, temperature=0
            )
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"
        assert caught.value.body["type"] == "server_error"  # type: ignore[index]
        assert caught.value.body["code"] == "overloaded"  # type: ignore[index]

        blocker.close()  # frees the slot: B, C and D go to the engine together
        texts, finish = streamed_texts(list(streamed))
        answers = [p.result(timeout=60).choices[0].text for p in plains]
    assert answers == [texts[0], texts[0]]
    assert finish == {0: "length"}
    after = scrape(slow_ferry)

    def exactly(size: int, metrics: dict[str, float]) -> float:
        upper = metrics[f'ferry_batch_size_bucket{{le="{float(size)}"}}']
        return upper - metrics[f'ferry_batch_size_bucket{{le="{float(size - 1)}"}}']

    assert exactly(3, after) == exactly(3, before) + 1, (
        "the streamed and plain requests shared one batch"
    )
    rejected = 'ferry_requests_total{outcome="rejected",protocol="openai"}'
    assert after[rejected] == before.get(rejected, 0) + 1


# ---- the incremental detokenizer ---------------------------------------------------------


def assemble(tokens: list[str], stops: tuple[str, ...] = ()) -> tuple[list[str], TextAssembler]:
    assembler = TextAssembler(TOKENIZER.decode, stops)
    deltas = []
    for token in tokens:
        deltas.append(assembler.push(token))
        if assembler.stopped:
            break
    deltas.append(assembler.finish())
    return deltas, assembler


def test_multibyte_characters_are_never_split() -> None:
    text = " héllo wörld 世界 🎉🎉 naïve"
    tokens = TOKENIZER.encode(text)[1:]
    assert len(tokens) > len(text.split())  # some characters span several byte tokens
    deltas, _ = assemble(tokens)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


VOCABULARY = gpt2_vocabulary()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, len(VOCABULARY) - 1), max_size=40),
    st.lists(st.text(min_size=1, max_size=4), max_size=4),
)
def test_deltas_concatenate_to_the_plain_text(ids: list[int], stops: list[str]) -> None:
    """Any token sequence (invalid UTF-8 included): the streamed text is the plain text, cut
    before the first stop string."""
    tokens = [VOCABULARY[i] for i in ids]
    full = TOKENIZER.decode(tokens)
    cuts = [full.find(s) for s in stops if s in full]
    expected = full[: min(cuts)] if cuts else full
    deltas, assembler = assemble(tokens, tuple(stops))
    assert "".join(deltas) == expected
    assert assembler.stopped == bool(cuts)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.integers(0, 59), st.integers(1, 5))
def test_stop_inside_real_text(text: str, at: int, length: int) -> None:
    stop = text[at : at + length]
    if not stop:
        return
    deltas, assembler = assemble(TOKENIZER.encode(text)[1:], (stop,))
    assert "".join(deltas) == text[: text.find(stop)]
    assert assembler.stopped


# ---- in process: failures mid-stream and at admission (fake engine held by events) --------


async def test_deadline_mid_stream_is_an_error_event_then_done() -> None:
    engine = GatedEngine(hold_at_step=1)  # one token, then the engine holds until released
    async with running_batcher(engine, max_batch_size=4, max_queue_size=4) as batcher:
        request = GenerationRequest(["</s>", "hi"], max_new_tokens=8, timeout_s=2.0, incremental=True)
        response = CompletionStream(Completion(batcher, [request]), Envelope("fake"), False)
        chunks = [chunk async for chunk in response]
        assert b'"text":"hi0"' in chunks[0]  # streamed before the deadline passed
        error = orjson.loads(chunks[1].removeprefix(b"data: "))
        assert error["error"]["type"] == "server_error"
        assert error["error"]["code"] == "timeout"
        assert chunks[2:] == [b"data: [DONE]\n\n"]
        assert isinstance(response.error, DeadlineExceeded)
        assert await batcher.wait_idle(WAIT_S)  # the ticket was let go


async def test_refused_prompt_abandons_the_admitted_ones() -> None:
    engine = GatedEngine(hold_at_step=0)
    async with running_batcher(engine, max_batch_size=4, max_queue_size=1) as batcher:
        # The only slot is held: further requests queue.
        busy = await occupy(batcher, engine, GenerationRequest(["</s>", "busy"], 2))
        requests = [GenerationRequest(["</s>", w], 2, incremental=True) for w in ("a", "b")]
        with pytest.raises(QueueFull):
            Completion(batcher, requests)  # "a" was admitted, "b" refused
        assert batcher.queue_depth == 0  # "a" left the queue: it will never be computed
        await busy.release(free_engine=False)
        assert await batcher.wait_idle(WAIT_S)
        assert [len(c.items) for c in engine.calls] == [1]


def test_a_stream_read_to_done_counts_ok(client: openai.OpenAI, ferry: FerryProcess) -> None:
    ok = 'ferry_requests_total{outcome="ok",protocol="openai"}'
    cancelled = 'ferry_requests_total{outcome="cancelled",protocol="openai"}'
    before = scrape(ferry)
    chunks = list(
        client.completions.create(
            model=ferry.model_name, prompt=REFERENCE_PROMPT, max_tokens=5, temperature=0, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    wait_for_metric(ferry, ok, lambda v: v >= before[ok] + 1)
    after = scrape(ferry)
    assert after[ok] == before[ok] + 1 and after[cancelled] == before[cancelled]
