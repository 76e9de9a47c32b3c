"""Tiny random EVE models, a tiny tokenizer, PNG bytes and a generated shapes dataset.

The one factory behind the test suite, the tiny training recipes (`model.tiny: true` with an empty
`data.path`) and the CPU benchmarks. Nothing is downloaded: the tokenizer is trained here on a few
sentences, the weights are random and the images are drawn.

A tiny checkpoint comes in two flavours, because tests and training want different random models:

- ``flavour="inference"`` (the default): 2 layers, weights drawn with std 0.2 (token embeddings
  1.0) so that a random model's greedy answer depends on its input; a tokenizer trained on generic
  sentences with the family's own special tokens (v1: ``<s> </s> <unk>``, v2: ChatML's) and the
  family's default chat template. Generation, chat, serving and evaluation tests use it.
- ``flavour="training"``: 4 layers and the model's own (small) initialisation, which trains stably;
  one tokenizer for both families, trained on the shapes corpus, with all five special tokens, and
  the ChatML template. The tiny training recipes use it::

      make_tiny_checkpoint(folder, version, seed=recipe.seed, flavour="training", **recipe.model.extra)
      generate_shapes_dataset(folder, n, kind, seed=recipe.seed)

Any `EveConfig` field passed as a keyword (``num_hidden_layers=3``, ``tie_word_embeddings=True``)
overrides the flavour's value.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageDraw

from .model import EveConfig, EveForCausalLM
from .processing import EveImageConfig, EveImageProcessor, EveProcessor

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")

Corpus = Literal["generic", "shapes"]
FlavourName = Literal["inference", "training"]

GENERIC_CORPUS = (
    "What is in the image? A red circle on a white background.",
    "Describe the picture. There is a blue square and a green triangle.",
    "How many shapes are there? Two shapes, one large and one small.",
    "The quick brown fox jumps over the lazy dog. Yes, no, maybe.",
    "USER: ASSISTANT: A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
)
SHAPES_CORPUS = (
    *(f"A {c} {s} on a white background." for c in COLORS for s in SHAPES),
    *(f"What color is the {s}? {c}. What shape is in the image? {s}." for c in COLORS for s in SHAPES),
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT: system user assistant",
    "Answer the question using a single word or phrase. yes no Is there a",
)
V2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
V1_SPECIALS = ("<unk>", "<s>", "</s>")
SHAPES_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "</s>", "<s>")


@dataclass(frozen=True)
class TinyFlavour:
    """Where a tiny model for tests and one for training differ (see the module docstring)."""

    num_hidden_layers: int
    init_std: float | None  # std of every 2-D weight but the embeddings; None: the model's own init
    embed_std: float | None  # std of the token embeddings; None: the model's own init
    corpus: Corpus  # the tokenizer's training text (and so its special tokens)
    template: str | None  # chat template saved with the processor; None: the family's default


FLAVOURS: dict[str, TinyFlavour] = {
    "inference": TinyFlavour(num_hidden_layers=2, init_std=0.2, embed_std=1.0, corpus="generic", template=None),
    "training": TinyFlavour(num_hidden_layers=4, init_std=None, embed_std=None, corpus="shapes", template="chatml"),
}


def get_flavour(flavour: FlavourName | TinyFlavour) -> TinyFlavour:
    if isinstance(flavour, TinyFlavour):
        return flavour
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown tiny-model flavour {flavour!r}: use one of {sorted(FLAVOURS)}")
    return FLAVOURS[flavour]


def make_tiny_tokenizer(
    version: str = "v2", *, corpus: Corpus = "generic", vocab_size: int = 400, folder: str | Path | None = None
):
    """A byte-level BPE tokenizer (so any text encodes), saved to `folder` when given.

    ``corpus="generic"``: generic sentences, the family's special tokens. ``corpus="shapes"``: the
    shapes captions and questions, all five special tokens whatever the version (ChatML EOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus == "shapes":
        specials, text = SHAPES_SPECIALS, SHAPES_CORPUS
    elif corpus == "generic":
        specials, text = (V2_SPECIALS if version == "v2" else V1_SPECIALS), GENERIC_CORPUS
    else:
        raise ValueError(f"unknown tokenizer corpus {corpus!r}: use 'generic' or 'shapes'")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(text) * 4, trainer)
    if corpus == "generic" and version != "v2":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
        )
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
        )
    if folder is not None:
        fast.save_pretrained(str(folder))
    return fast


def tiny_image_config(version: str = "v2") -> EveImageConfig:
    """v1: 112 px squares -> a 4x4 token grid, teacher canvas 56 px in 14 px patches; v2: <= 64 px."""
    if version == "v2":
        return EveImageConfig(version="v2", max_size=64, patch_stride=16, dense_stride=2)
    return EveImageConfig(
        version="v1", image_size=112, image_size_clip=56, patch_stride=14, patch_stride_clip=14, conv_stride=2
    )


def tiny_model_config(
    version: str,
    vocab_size: int,
    *,
    flavour: FlavourName | TinyFlavour = "inference",
    **overrides: Any,
) -> EveConfig:
    """A ~100k-parameter EVE config of `version`'s family; `overrides` are EveConfig fields."""
    fields: dict[str, Any] = dict(
        version=version,
        family="qwen2" if version == "v2" else "llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=get_flavour(flavour).num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vision_hidden_size=32,
        patch_stride=16 if version == "v2" else 14,
        merge_stride=2,
        modality_experts=version == "v2",
        attention_bias=version == "v2",
        max_position_embeddings=1024,
    )
    fields.update(overrides)
    return EveConfig(**fields)


def make_tiny_checkpoint(
    folder: str | Path,
    version: str = "v2",
    *,
    seed: int = 0,
    flavour: FlavourName | TinyFlavour = "inference",
    **config_overrides: Any,
) -> Path:
    """Write a random tiny EVE checkpoint (weights, config, tokenizer, processor) to `folder`.

    The folder loads like a real checkpoint with `EveForCausalLM.from_pretrained` and
    `EveProcessor.from_pretrained`; the same arguments always give the same weights.
    """
    spec = get_flavour(flavour)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(version, corpus=spec.corpus)
    overrides = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    overrides.update(config_overrides)
    config = tiny_model_config(version, len(tokenizer), flavour=spec, **overrides)
    torch.manual_seed(seed)
    model = EveForCausalLM(config)
    with torch.no_grad():
        if spec.init_std is not None:
            for name, param in model.named_parameters():
                if param.dim() == 2 and "embed_tokens" not in name:
                    param.normal_(0, spec.init_std)
        if spec.embed_std is not None:
            model.model.embed_tokens.weight.normal_(0, spec.embed_std)
    model.save_pretrained(folder)
    processor = EveProcessor(EveImageProcessor(tiny_image_config(version)), tokenizer, template=spec.template)
    processor.save_pretrained(folder)
    return folder


def make_png(
    width: int = 48, height: int = 32, color: tuple[int, int, int] = (200, 30, 30), seed: int = 0
) -> bytes:
    """PNG bytes of a small noisy image (noise, so that different images give different visual tokens)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 60, (height, width, 3), generator=gen, dtype=torch.int32)
    base = torch.tensor(color, dtype=torch.int32)
    arr = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def draw_shape(color: str, shape: str, size: int = 64, seed: int = 0) -> Image.Image:
    """One `color` `shape` (see COLORS, SHAPES) at a seeded size and place on a white square."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def generate_shapes_dataset(folder: str | Path, n: int = 256, kind: str = "caption", seed: int = 0) -> Path:
    """`n` images of coloured shapes + LLaVA-style records in `folder`; returns the JSONL path.

    ``kind="caption"``: "A red circle on a white background."; any other kind: one question about
    the colour or the shape, answered in one word. Images already on disk are reused.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = folder / f"{kind}.jsonl"
    with out.open("w") as f:
        for i in range(n):
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            name = f"images/{i:05d}.png"
            if not (folder / name).exists():
                draw_shape(color, shape, seed=seed * 100_003 + i).save(folder / name)
            if kind == "caption":
                conv = [
                    {"from": "human", "value": "<image>"},
                    {"from": "gpt", "value": f"A {color} {shape} on a white background."},
                ]
            else:
                q, a = ("What color is the shape?", color) if rng.random() < 0.5 else ("What shape is in the image?", shape)
                conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
            f.write(json.dumps({"id": f"{kind}-{i}", "image": name, "conversations": conv}) + "\n")
    return out
