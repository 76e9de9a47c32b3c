"""Tiny random models, a tiny tokenizer and generated image-text data: CPU tests and demos.

Nothing is downloaded: the tokenizer is trained on the generated corpus itself.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</s>", "<s>"]


def make_tiny_tokenizer(folder: str | Path | None = None):
    """A byte-level BPE tokenizer (~400 tokens) covering the generated corpus and chat templates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"A {c} {s} on a white background." for c in COLORS for s in SHAPES]
    corpus += [f"What color is the {s}? {c}. What shape is in the image? {s}." for c in COLORS for s in SHAPES]
    corpus += [
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT: system user assistant",
        "Answer the question using a single word or phrase. yes no Is there a",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    if folder is not None:
        fast.save_pretrained(str(folder))
    return fast


def tiny_model_config(version: str, vocab_size: int, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        version=version,
        family="qwen2" if version == "v2" else "llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vision_hidden_size=32,
        patch_stride=16 if version == "v2" else 14,
        merge_stride=2,
        modality_experts=version == "v2",
        attention_bias=version == "v2",
        max_position_embeddings=1024,
    )
    cfg.update(overrides)
    return cfg


def tiny_image_config(version: str):
    from ..processing.images import EveImageConfig

    if version == "v1":
        # 112 px squares -> 4x4 token grid; teacher canvas 56 px with 14 px patches
        return EveImageConfig(version="v1", image_size=112, image_size_clip=56, patch_stride=14, patch_stride_clip=14, conv_stride=2)
    return EveImageConfig(version="v2", max_size=64, patch_stride=16, dense_stride=2)


def make_tiny_checkpoint(folder: str | Path, version: str = "v2", seed: int = 0, **overrides: Any) -> Path:
    """A tiny random EVE model + processor saved in `folder` (loadable by from_pretrained)."""
    import torch

    from ..model import EveConfig, EveForCausalLM
    from ..processing.images import EveImageProcessor
    from ..processing.processor import EveProcessor

    folder = Path(folder)
    tokenizer = make_tiny_tokenizer()
    cfg = EveConfig(
        **tiny_model_config(
            version,
            len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **overrides,
        )
    )
    torch.manual_seed(seed)
    model = EveForCausalLM(cfg)
    model.save_pretrained(folder)
    EveProcessor(EveImageProcessor(tiny_image_config(version)), tokenizer, template="chatml").save_pretrained(folder)
    return folder


def draw_shape(color: str, shape: str, size: int = 64, seed: int = 0) -> Image.Image:
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
    """Images of coloured shapes + LLaVA-style records (captions or Q/A); returns the JSONL path."""
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
                conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"A {color} {shape} on a white background."}]
            else:
                q, a = ("What color is the shape?", color) if rng.random() < 0.5 else ("What shape is in the image?", shape)
                conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
            f.write(json.dumps({"id": f"{kind}-{i}", "image": name, "conversations": conv}) + "\n")
    return out
