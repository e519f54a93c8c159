"""Prompt encoding (tiktoken's BPE over GPT-2's files) gives Hugging Face's tokens exactly."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from predictor.tokenizer import BOS, gpt2_vocabulary, shared_tokenizer
from tests.conftest import REFERENCE_PROMPT

TOKENIZER = shared_tokenizer()
CASES = [
    REFERENCE_PROMPT,
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "it's we're they've I'm you'll he'd IT'S",
    "numbers 12345 67.89 1,000,000",
    "</s> looks special <s> <pad> <unk>",
    "émojis 🎉🎉 and 中文字符 and Ελληνικά",
    "a" * 500,
    "\u00a0non-breaking\u2003spaces\u200b",
]


def test_the_reference_prompt() -> None:
    expected = [BOS, "Hello", "ĠWorld", ",", "Ġwhat", "Ġis", "Ġyour", "Ġname", "Ġdog", "?"]
    assert TOKENIZER.encode(REFERENCE_PROMPT) == expected


def test_same_tokens_as_hugging_face_on_hard_cases() -> None:
    for text in CASES:
        assert TOKENIZER.encode(text) == TOKENIZER.encode_reference(text), text
        assert TOKENIZER.count(text) == len(TOKENIZER.encode_reference(text))


def test_same_tokens_as_hugging_face_on_vocabulary_soup() -> None:
    vocabulary = gpt2_vocabulary()
    rng = random.Random(7)
    for _ in range(50):
        text = TOKENIZER.decode(rng.choices(vocabulary, k=rng.randint(1, 60)))
        assert TOKENIZER.encode(text) == TOKENIZER.encode_reference(text), text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_same_tokens_as_hugging_face_on_any_text(text: str) -> None:
    assert TOKENIZER.encode(text) == TOKENIZER.encode_reference(text)
