"""End of sequence: every route stops a sequence at the model's end token unless the request
says `ignore_eos`. Proven on a real CTranslate2 model whose weights emit `</s>` from a known
position on (`python -m predictor.build_model eos`), on the engine alone, through the batcher, and
through every protocol of a real server; and on the SimulatedEngine's configurable EOS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from predictor.batcher import Batcher, GenerationRequest, TextDelta
from predictor.engine import (
    GREEDY,
    Collect,
    CTranslate2Engine,
    EngineItem,
    EngineOutput,
    LatencyModel,
    SimulatedEngine,
)
from predictor.protocols import generate, v1
from predictor.tokenizer import EOS, shared_tokenizer
from tests.conftest import REFERENCE_PROMPT, ROOT, FerryProcess
from tests.fakes import WAIT_S, GatedEngine
from tests.helpers import grpc_text_request, limits, occupy, openai_client, running_batcher, serving, streamed

EOS_MODEL = ROOT / "models" / "eos"
EOS_POSITION = 16  # the builder's default: positions >= 16 predict </s>
TOKENIZER = shared_tokenizer()
PROMPTS = [REFERENCE_PROMPT, "The quick brown fox", "a"]
ASKED = 24  # more than any of these prompts gets before EOS


def ensure_eos_model() -> Path:
    if not (EOS_MODEL / "model.bin").is_file():
        subprocess.run([sys.executable, "-m", "predictor.build_model", "eos", str(EOS_MODEL)], check=True, cwd=ROOT)
    return EOS_MODEL


def tokens_until_eos(prompt: str) -> int:
    """New tokens (the end token included) the EOS model gives a prompt: the token predicted
    at position p is new token p - L + 2 for a prompt of L tokens."""
    length = len(TOKENIZER.encode(prompt))
    return max(1, EOS_POSITION - length + 2)


# ---- the CTranslate2 engine alone --------------------------------------------------------


@pytest.fixture(scope="module")
def eos_engine() -> Iterator[CTranslate2Engine]:
    engine = CTranslate2Engine(ensure_eos_model(), name="eos", device="cpu", inter_threads=1, intra_threads=1)
    yield engine
    engine.close()


def run(engine: CTranslate2Engine, items: list[EngineItem]) -> list[EngineOutput]:
    listener = Collect(len(items))
    engine.generate(items, GREEDY, listener)
    assert all(o is not None for o in listener.outputs)
    return [o for o in listener.outputs if o is not None]


def items_for(prompts: list[str], tokens: int | list[int], *, ignore_eos: bool) -> list[EngineItem]:
    counts = tokens if isinstance(tokens, list) else [tokens] * len(prompts)
    return [EngineItem(TOKENIZER.encode(p), n, ignore_eos=ignore_eos) for p, n in zip(prompts, counts, strict=True)]


def test_eos_model_ends_each_sequence_at_its_position(eos_engine: CTranslate2Engine) -> None:
    assert eos_engine.end_token == EOS
    # Equal lengths, plain: the fast path (no per-step callback); CTranslate2 ends sequences.
    outputs = run(eos_engine, items_for(PROMPTS, ASKED, ignore_eos=False))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected = tokens_until_eos(prompt)
        assert expected < ASKED
        assert output.finish_reason == "eos", prompt
        assert output.generated_tokens == expected, prompt
        assert output.tokens[-1] == EOS and EOS not in output.tokens[:-1]
        assert output.text == TOKENIZER.decode(output.tokens[:-1])


def test_per_step_and_streamed_paths_agree_with_the_fast_path(eos_engine: CTranslate2Engine) -> None:
    fast = run(eos_engine, items_for(PROMPTS, ASKED, ignore_eos=False))
    # Mixed lengths: the per-step callback path.
    mixed = run(eos_engine, items_for(PROMPTS, [ASKED, ASKED + 1, ASKED + 2], ignore_eos=False))
    assert [(o.tokens, o.finish_reason) for o in mixed] == [(o.tokens, o.finish_reason) for o in fast]
    # Per-token items (stop strings / streams): the text assembler sees every token.
    from predictor.text import TextAssembler

    streamed = items_for(PROMPTS, ASKED, ignore_eos=False)
    for item in streamed:
        item.assembler = TextAssembler(TOKENIZER.decode)
    outputs = run(eos_engine, streamed)
    assert [(o.tokens, o.text, o.finish_reason) for o in outputs] == [(o.tokens, o.text, o.finish_reason) for o in fast]


def test_ignore_eos_gives_the_exact_count(eos_engine: CTranslate2Engine) -> None:
    for counts in (ASKED, [ASKED, ASKED - 3, ASKED - 7]):
        outputs = run(eos_engine, items_for(PROMPTS, counts, ignore_eos=True))
        wanted = counts if isinstance(counts, list) else [counts] * len(PROMPTS)
        assert [o.generated_tokens for o in outputs] == wanted
        assert all(o.finish_reason == "length" and EOS not in o.tokens for o in outputs)


def test_a_direct_call_that_mixes_eos_handling_is_split(eos_engine: CTranslate2Engine) -> None:
    mixed = items_for(PROMPTS[:1], ASKED, ignore_eos=True) + items_for(PROMPTS[:1], ASKED, ignore_eos=False)
    exact, ended = run(eos_engine, mixed)
    assert (exact.generated_tokens, exact.finish_reason) == (ASKED, "length")
    assert (ended.generated_tokens, ended.finish_reason) == (tokens_until_eos(PROMPTS[0]), "eos")


# ---- the batcher, with the SimulatedEngine's EOS ------------------------------------------


@pytest.fixture
async def sim_batcher() -> AsyncIterator[Batcher]:
    engine = SimulatedEngine(name="sim", latency=LatencyModel(0.0, 0.0, 0.0), eos_after=3)
    async with running_batcher(engine, max_batch_size=8, chunk_tokens=4) as batcher:
        yield batcher


async def test_simulated_eos_plain_streamed_and_ignored(sim_batcher: Batcher) -> None:
    prompt = TOKENIZER.encode(REFERENCE_PROMPT)
    plain = await sim_batcher.submit(GenerationRequest(prompt, 10)).result()
    assert (plain.generated_tokens, plain.finish_reason, plain.tokens[-1]) == (3, "eos", EOS)
    events = [e async for e in sim_batcher.submit(GenerationRequest(prompt, 10, incremental=True))]
    final = events[-1]
    assert isinstance(final, EngineOutput) and final.finish_reason == "eos"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == plain.text == final.text
    exact = await sim_batcher.submit(GenerationRequest(prompt, 10, ignore_eos=True)).result()
    assert (exact.generated_tokens, exact.finish_reason) == (10, "length")
    assert EOS not in exact.tokens


async def test_chunked_request_ends_at_eos_in_a_later_chunk() -> None:
    engine = SimulatedEngine(name="sim", latency=LatencyModel(0.0, 0.0, 0.0), eos_after=10)
    async with running_batcher(engine, max_batch_size=8, chunk_tokens=4) as batcher:
        prompt = TOKENIZER.encode(REFERENCE_PROMPT)
        # Submitted together: one batch, so the long one decodes in chunks of 4.
        long, short = batcher.submit(GenerationRequest(prompt, 30)), batcher.submit(GenerationRequest(prompt, 2))
        out_long, out_short = await asyncio.wait_for(asyncio.gather(long.result(), short.result()), WAIT_S)
        assert (out_short.generated_tokens, out_short.finish_reason) == (2, "length")
        assert (out_long.generated_tokens, out_long.finish_reason) == (10, "eos")
        assert out_long.text == TOKENIZER.decode(out_long.tokens)


async def test_eos_and_ignore_eos_requests_go_to_separate_batches() -> None:
    engine = GatedEngine(hold_at_step=0)
    async with running_batcher(engine, max_batch_size=8) as batcher:
        held = await occupy(batcher, engine, GenerationRequest(["</s>", "x"], 2))
        others = [batcher.submit(GenerationRequest(["</s>", f"w{i}"], 2, ignore_eos=i % 2 == 0)) for i in range(4)]
        await held.release()
        await asyncio.wait_for(asyncio.gather(*(o.result() for o in others)), WAIT_S)
        calls = engine.calls[1:]
        assert sorted(len(c.items) for c in calls) == [2, 2]
        for call in calls:
            assert len({item.ignore_eos for item in call.items}) == 1


# ---- parsing -----------------------------------------------------------------------------

LIMITS = limits()


def test_ignore_eos_fields_parse_and_default_to_false() -> None:
    engine = GatedEngine()
    assert generate.parse({"text": "a"}, engine, LIMITS).ignore_eos is False
    assert generate.parse({"text": "a", "ignore_eos": True}, engine, LIMITS).ignore_eos is True
    requests = v1.parse(
        {"instances": ["a", {"text": "b", "ignore_eos": False}], "parameters": {"ignore_eos": True}},
        engine,
        LIMITS,
    )
    assert [r.ignore_eos for r in requests] == [True, False]
    with pytest.raises(Exception, match="ignore_eos: must be true or false"):
        generate.parse({"text": "a", "ignore_eos": "yes"}, engine, LIMITS)


# ---- every protocol of a real server on the EOS model -------------------------------------


@pytest.fixture(scope="module")
def eos_ferry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerryProcess]:
    with serving(tmp_path_factory.mktemp("eos"), model_dir=ensure_eos_model()) as server:
        yield server


@pytest.fixture(scope="module")
def client(eos_ferry: FerryProcess) -> openai.OpenAI:
    return openai_client(eos_ferry)


def test_openai_completion_stops_at_eos(client: openai.OpenAI, eos_ferry: FerryProcess) -> None:
    result = client.completions.create(model=eos_ferry.model_name, prompt=PROMPTS, max_tokens=ASKED, temperature=0)
    assert [c.finish_reason for c in result.choices] == ["stop"] * len(PROMPTS)
    assert result.usage is not None
    assert result.usage.completion_tokens == sum(tokens_until_eos(p) for p in PROMPTS) < ASKED * len(PROMPTS)
    for prompt, choice in zip(PROMPTS, result.choices, strict=True):
        alone = client.completions.create(model=eos_ferry.model_name, prompt=prompt, max_tokens=ASKED, temperature=0)
        assert alone.choices[0].text == choice.text and alone.choices[0].finish_reason == "stop"
        assert alone.usage is not None and alone.usage.completion_tokens == tokens_until_eos(prompt)
    chunks = streamed(
        client.completions.create, model=eos_ferry.model_name, prompt=REFERENCE_PROMPT, max_tokens=ASKED, temperature=0
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == result.choices[0].text and finish == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == tokens_until_eos(REFERENCE_PROMPT)


def test_openai_ignore_eos_keeps_the_exact_count(client: openai.OpenAI, eos_ferry: FerryProcess) -> None:
    kwargs: dict[str, Any] = {
        "model": eos_ferry.model_name,
        "prompt": REFERENCE_PROMPT,
        "max_tokens": ASKED,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    result = client.completions.create(**kwargs)
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == ASKED
    chunks = streamed(client.completions.create, **kwargs)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == ASKED
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=eos_ferry.model_name, prompt="a", max_tokens=2, extra_body={"ignore_eos": "yes"}
        )


def test_generate_v1_v2_and_grpc_count_what_they_got(eos_ferry: FerryProcess) -> None:
    url = eos_ferry.url
    expected = tokens_until_eos(REFERENCE_PROMPT)
    body = {"text": REFERENCE_PROMPT, "max_new_tokens": ASKED}
    assert httpx.post(f"{url}/generate", json=body, timeout=30).json()["generated_tokens"] == expected
    exact = httpx.post(f"{url}/generate", json={**body, "ignore_eos": True}, timeout=30).json()
    assert exact["generated_tokens"] == ASKED

    v1_body = {
        "instances": [REFERENCE_PROMPT, {"text": REFERENCE_PROMPT, "ignore_eos": True}],
        "parameters": {"max_new_tokens": ASKED},
    }
    predictions = httpx.post(f"{url}/v1/models/{eos_ferry.model_name}:predict", json=v1_body, timeout=30).json()
    assert [p["generated_tokens"] for p in predictions["predictions"]] == [expected, ASKED]

    def v2_body(ignore_eos: bool | None) -> dict[str, object]:
        parameters: dict[str, object] = {"max_new_tokens": ASKED}
        if ignore_eos is not None:
            parameters["ignore_eos"] = ignore_eos
        text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": [REFERENCE_PROMPT]}
        return {"inputs": [text], "parameters": parameters}

    for ignore, count in ((None, expected), (True, ASKED)):
        answer = httpx.post(f"{url}/v2/models/{eos_ferry.model_name}/infer", json=v2_body(ignore), timeout=30)
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        assert outputs["generated_tokens"]["data"] == [count]

    with grpc.insecure_channel(eos_ferry.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for ignore, count in ((False, expected), (True, ASKED)):
            request = grpc_text_request(eos_ferry.model_name, max_new_tokens=ASKED, ignore_eos=ignore)
            response = stub.ModelInfer(request, timeout=30)
            outputs = {o.name: o for o in response.outputs}
            assert list(outputs["generated_tokens"].contents.int_contents) == [count]


def test_eos_is_counted_by_finish_reason(eos_ferry: FerryProcess) -> None:
    from tests.conftest import scrape

    for ignore_eos in (False, True):
        body = {"text": "a", "max_new_tokens": ASKED, "ignore_eos": ignore_eos}
        assert httpx.post(f"{eos_ferry.url}/generate", json=body, timeout=30).status_code == 200
    values = scrape(eos_ferry)
    key = 'ferry_requests_finished_total{finish_reason="%s",model_name="opt-125m"}'
    assert values[key % "eos"] >= 1
    assert values[key % "length"] >= 1  # the ignore_eos ones


def test_chat_stops_at_eos_unless_ignored(client: openai.OpenAI, eos_ferry: FerryProcess) -> None:
    messages = [{"role": "user", "content": "Hi"}]  # the default template: "User: Hi\nAssistant:"
    prompt = "User: Hi\nAssistant:"
    ended = client.chat.completions.create(
        model=eos_ferry.model_name, messages=messages, max_tokens=ASKED, temperature=0
    )
    assert ended.choices[0].finish_reason == "stop"
    assert ended.usage is not None and ended.usage.completion_tokens == tokens_until_eos(prompt)
    exact = client.chat.completions.create(
        model=eos_ferry.model_name, messages=messages, max_tokens=ASKED, temperature=0, extra_body={"ignore_eos": True}
    )
    assert exact.choices[0].finish_reason == "length"
    assert exact.usage is not None and exact.usage.completion_tokens == ASKED
