"""Log-probabilities through the official `openai` client against the real server on the tiny
CTranslate2 model: completions `logprobs` (tokens, token_logprobs, top_logprobs, text_offset),
`echo` + `max_tokens: 0` prompt scoring that matches CTranslate2's `score_batch` called
directly, the lm-evaluation-harness request shape, and chat `logprobs`/`top_logprobs`."""

from __future__ import annotations

import math

import ctranslate2
import openai
import pytest

from predictor.tokenizer import shared_tokenizer
from tests.conftest import REFERENCE_PROMPT, TINY_MODEL, FerryProcess
from tests.helpers import openai_client

TOKENIZER = shared_tokenizer()


@pytest.fixture(scope="module")
def client(ferry: FerryProcess) -> openai.OpenAI:
    return openai_client(ferry)


def test_completion_logprobs(client: openai.OpenAI, ferry: FerryProcess) -> None:
    result = client.completions.create(
        model=ferry.model_name, prompt=REFERENCE_PROMPT, max_tokens=6, temperature=0, logprobs=3
    )
    (choice,) = result.choices
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert len(logprobs.tokens) == 6
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    assert logprobs.token_logprobs is not None
    for token_logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert token_logprob is not None and token_logprob <= 0
        assert top is not None and 1 <= len(top) <= 3
        # Greedy: the chosen token is the likeliest one.
        assert token_logprob == pytest.approx(max(top.values()), abs=1e-5)
    # Asking for log-probabilities does not change the text.
    plain = client.completions.create(model=ferry.model_name, prompt=REFERENCE_PROMPT, max_tokens=6, temperature=0)
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None


def test_echo_scoring_matches_score_batch(client: openai.OpenAI, ferry: FerryProcess) -> None:
    prompts = [REFERENCE_PROMPT, "The capital of France is Paris"]
    result = client.completions.create(
        model=ferry.model_name, prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    generator = ctranslate2.Generator(str(TINY_MODEL), device="cpu", compute_type="int8", inter_threads=1)
    direct = generator.score_batch([TOKENIZER.encode(p) for p in prompts])
    for prompt, choice, expected in zip(prompts, result.choices, direct, strict=True):
        assert choice.text == prompt
        assert result.usage is not None
        logprobs = choice.logprobs
        assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.tokens is not None
        # The prompt's own tokens (OPT's leading </s> is ferry's, not the client's): the first
        # has no log-probability, the others are score_batch's.
        assert "".join(logprobs.tokens) == prompt
        assert logprobs.token_logprobs[0] is None
        assert len(logprobs.token_logprobs) == len(expected.log_probs)
        for got, want in zip(logprobs.token_logprobs[1:], expected.log_probs[1:], strict=True):
            assert got is not None and math.isclose(got, want, abs_tol=2e-3), (got, want)
    assert result.usage is not None and result.usage.completion_tokens == 0


def test_lm_eval_loglikelihood_request_shape(client: openai.OpenAI, ferry: FerryProcess) -> None:
    """lm-evaluation-harness's local-completions: echo, max_tokens 1, logprobs 1, then
    token_logprobs[ctxlen:-1] and whether each is the top one."""
    context, continuation = "Hello World, what is your", " name dog?"
    result = client.completions.create(
        model=ferry.model_name, prompt=[context + continuation], max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    ctxlen = len(TOKENIZER.encode(context)) - 1  # the client's tokens: no leading </s>
    whole = len(TOKENIZER.encode(context + continuation)) - 1
    assert len(logprobs.token_logprobs) == whole + 1  # the prompt, then the one generated token
    continuation_logprobs = logprobs.token_logprobs[ctxlen:-1]
    assert len(continuation_logprobs) == whole - ctxlen
    assert all(lp is not None and lp <= 0 for lp in continuation_logprobs)
    assert all(top is not None and len(top) == 1 for top in logprobs.top_logprobs[1:])
    assert logprobs.tokens is not None and "".join(logprobs.tokens[:-1]) == context + continuation


def test_chat_logprobs(client: openai.OpenAI, ferry: FerryProcess) -> None:
    chat = client.chat.completions.create(
        model=ferry.model_name,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == 5
    assert "".join(t.token for t in logprobs.content) == chat.choices[0].message.content
    for token in logprobs.content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-5)
        assert token.bytes == list(token.token.encode())


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"logprobs": True, "top_logprobs": 9}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs")],
)
def test_bad_chat_logprobs(client: openai.OpenAI, ferry: FerryProcess, kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=ferry.model_name, messages=[{"role": "user", "content": "x"}], max_tokens=2, **kwargs
        )
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == param


def test_scoring_groups_stay_within_the_token_budget() -> None:
    from predictor.engine import _by_token_budget

    sequences = [["t"] * n for n in (3, 5, 2, 9, 1, 4)]
    groups = _by_token_budget(sequences, 10)
    assert [s for group in groups for s in group] == sequences  # every sequence, in order
    assert all(len(g) * max(len(s) for s in g) <= 10 or len(g) == 1 for g in groups)
    assert _by_token_budget([["t"] * 30], 10) == [[["t"] * 30]]  # a long one goes alone
