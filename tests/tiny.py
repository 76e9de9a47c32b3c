"""A tiny random EVE checkpoint (model + tokenizer + preprocessor) for tests; builds in ~1 s on CPU.

`make_tiny_checkpoint(path)` writes a folder that `EveForCausalLM.from_pretrained` and
`EveProcessor.from_pretrained` load like a real checkpoint. Nothing is downloaded: the tokenizer is a
byte-level BPE trained here on a few sentences.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from eve_vlm.model import EveConfig, EveForCausalLM
from eve_vlm.processing import EveImageConfig, EveImageProcessor, EveProcessor

_CORPUS = [
    "What is in the image? A red circle on a white background.",
    "Describe the picture. There is a blue square and a green triangle.",
    "How many shapes are there? Two shapes, one large and one small.",
    "The quick brown fox jumps over the lazy dog. Yes, no, maybe.",
    "USER: ASSISTANT: A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
]
V2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
V1_SPECIALS = ["<unk>", "<s>", "</s>"]


def make_tiny_tokenizer(version: str = "v2", vocab_size: int = 400):
    """Byte-level BPE (so any text encodes) with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = V2_SPECIALS if version == "v2" else V1_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if version == "v2":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def tiny_image_config(version: str = "v2") -> EveImageConfig:
    if version == "v2":
        return EveImageConfig(version="v2", max_size=64, patch_stride=16, dense_stride=2)
    return EveImageConfig(
        version="v1", image_size=112, image_size_clip=56, patch_stride=14, patch_stride_clip=14, conv_stride=2
    )


def tiny_model_config(vocab_size: int, eos_token_id: int, version: str = "v2", **overrides) -> EveConfig:
    if version == "v2":
        fields = dict(
            version="v2",
            family="qwen2",
            attention_bias=True,
            vision_hidden_size=32,
            patch_stride=16,
            merge_stride=2,
            modality_experts=True,
        )
    else:
        fields = dict(version="v1", family="llama", vision_hidden_size=32, patch_stride=14, merge_stride=2)
    fields.update(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=eos_token_id,
    )
    fields.update(overrides)
    return EveConfig(**fields)


def make_tiny_checkpoint(path: str | Path, version: str = "v2", *, seed: int = 0, **config_overrides) -> Path:
    """Write a random tiny EVE `version` checkpoint (weights, config, tokenizer, preprocessor) to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(version)
    config = tiny_model_config(len(tokenizer), tokenizer.eos_token_id, version, **config_overrides)
    torch.manual_seed(seed)
    model = EveForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so greedy answers depend on the input
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed_tokens" not in name:
                param.normal_(0, 0.2)
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    EveProcessor(EveImageProcessor(tiny_image_config(version)), tokenizer).save_pretrained(path)
    return path


def make_png(
    width: int = 48, height: int = 32, color: tuple[int, int, int] = (200, 30, 30), seed: int = 0
) -> bytes:
    """PNG bytes of a small noisy image (noise so different images give different visual tokens)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 60, (height, width, 3), generator=gen, dtype=torch.int32)
    base = torch.tensor(color, dtype=torch.int32)
    arr = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
