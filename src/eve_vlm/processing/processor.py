"""EveProcessor: the image processor, the tokenizer and the chat template behind one object."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .images import EveImageProcessor, load_image, v1_teacher_layout
from .presets import resolve_image_config
from .templates import ChatTemplate, default_template_for, get_template
from .tokenization import count_placeholders, encode_conversation, encode_prompt, tokenize_with_images

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG_NAME = "eve_processor.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _group_images(images: Any, counts: list[int]) -> list[list[Any]]:
    """Split ``images`` (flat, row-major, or one list per sample) into per-sample lists; validate counts."""
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    nested = (
        len(images) == len(counts) and len(images) > 0 and all(isinstance(x, (list, tuple)) for x in images)
    )
    if nested:
        groups = [list(x) for x in images]
        for i, (group, n) in enumerate(zip(groups, counts, strict=True)):
            if len(group) != n:
                raise ValueError(
                    f"sample {i} has {n} <image> placeholder(s) but {len(group)} image(s) were given"
                )
        return groups
    if any(isinstance(x, (list, tuple)) for x in images):
        raise ValueError("images must be a flat list, or one list per text sample")
    if len(images) != sum(counts):
        per_sample = ", ".join(f"sample {i}: {n}" for i, n in enumerate(counts))
        raise ValueError(
            f"{len(images)} image(s) given but the text has {sum(counts)} <image> placeholder(s) ({per_sample})"
        )
    groups, start = [], 0
    for n in counts:
        groups.append(list(images[start : start + n]))
        start += n
    return groups


class EveProcessor:
    """Prepares model inputs: ``input_ids`` with -200 at each image, ``attention_mask``, ``images``."""

    def __init__(
        self,
        image_processor: EveImageProcessor,
        tokenizer: Any = None,
        template: str | ChatTemplate | None = None,
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self._template = get_template(template or default_template_for(image_processor.config.version))
        self.template = self._template.name

    # ------------------------------------------------------------------ construction / saving
    @property
    def version(self) -> str:
        return self.image_processor.config.version

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, template: str | None = None, **hf_kwargs: Any) -> EveProcessor:
        """Load from a checkpoint or processor folder (image config resolved per ``resolve_image_config``).

        ``hf_kwargs`` are the options ``AutoProcessor.from_pretrained`` passes along
        (``trust_remote_code``, cache and hub options): a local folder needs none of them.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"processor folder not found: {path}")
        model_config = None
        if (path / "config.json").is_file():
            model_config = json.loads((path / "config.json").read_text())
        image_processor = EveImageProcessor(resolve_image_config(path, model_config))
        tokenizer = None
        if any((path / f).is_file() for f in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        else:
            logger.info("no tokenizer files in %s; processor has images only", path)
        if template is None and (path / PROCESSOR_CONFIG_NAME).is_file():
            template = json.loads((path / PROCESSOR_CONFIG_NAME).read_text()).get("template")
        return cls(image_processor, tokenizer, template)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(path))
        meta = {"template": self.template, "version": self.version}
        (path / PROCESSOR_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    # ------------------------------------------------------------------ text helpers
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this EveProcessor has no tokenizer")
        return self.tokenizer

    @property
    def pad_token_id(self) -> int:
        tok = self._require_tokenizer()
        for candidate in (tok.pad_token_id, tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        logger.warning("tokenizer has neither pad nor eos token; padding with id 0")
        return 0

    @property
    def stop_strings(self) -> list[str]:
        return [self._template.stop_str] if self._template.stop_str else []

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True) -> str:
        return self._template.render(messages, add_generation_prompt=add_generation_prompt)

    def encode_conversation(
        self, messages: Any, *, num_images: int | None = None
    ) -> tuple[list[int], list[int]]:
        """Training ids + labels for one conversation with this processor's template."""
        return encode_conversation(messages, self._require_tokenizer(), self._template, num_images=num_images)

    def encode_prompt(self, messages: Any, *, num_images: int | None = None) -> list[int]:
        """Inference ids (generation prompt appended), tokenised the same way as training."""
        return encode_prompt(messages, self._require_tokenizer(), self._template, num_images=num_images)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(t) for t in ids if int(t) >= 0]  # drop -200 / -100
        return self._require_tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Any, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in batch]

    def num_image_tokens(self, pixels: torch.Tensor) -> int:
        return self.image_processor.num_image_tokens(pixels)

    # ------------------------------------------------------------------ model inputs
    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        *,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
        add_bos: bool | None = None,
        training: bool | None = None,
    ) -> dict[str, Any]:
        """Tokenise prompts (already rendered, ``<image>`` placeholders included) and process images.

        ``images`` is a flat list in placeholder order (row-major over the batch) or one list per
        sample; items may be PIL images, paths, bytes or data URLs. Returns ``input_ids`` and
        ``attention_mask`` [B, T] (padded on ``padding_side``) and ``images``: a flat list of
        [3, H, W] tensors in placeholder order.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if text is None:
            return {"images": self.image_processor(images, training=training) if images is not None else []}
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text is an empty list")
        tok = self._require_tokenizer()
        bos = self._template.add_bos if add_bos is None else add_bos
        rows = [tokenize_with_images(t, tok, add_bos=bos) for t in texts]
        groups = _group_images(images, [count_placeholders(r) for r in rows])
        pixel_list = [p for group in groups for p in self.image_processor(group, training=training)]

        if return_tensors is None:
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "images": pixel_list}
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "images": pixel_list}

    def images_for_teacher(
        self,
        images: Any,
        teacher_size: int | None = None,
        teacher_patch: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """v1 PAL teacher inputs: pixels [N, 3, S, S] and valid-patch masks [N, S/p, S/p] (bool).

        Defaults are the official CLIP teacher geometry (image_size_clip / patch_stride_clip).
        """
        cfg = self.image_processor.config
        if cfg.version != "v1":
            raise ValueError("teacher inputs exist for EVE v1 only (v2 has no patch aligning layer)")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("images_for_teacher needs at least one image")
        outs = [
            v1_teacher_layout(
                load_image(img), cfg, size=teacher_size, patch=teacher_patch, mean=mean, std=std
            )
            for img in images
        ]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


__all__ = ["EveProcessor", "PROCESSOR_CONFIG_NAME"]
