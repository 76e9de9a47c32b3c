"""`EveImageProcessorHF`: our image preprocessing behind transformers' `BaseImageProcessor` API.

It exists so that `AutoImageProcessor.from_pretrained(folder)` works on an EVE folder. The pixel
arithmetic stays in `images.py` (it reproduces the official resize bit for bit, which a
transformers image-processor backend would not): this class only reads and writes the same
preprocessor_config.json and calls `EveImageProcessor`, so both give identical tensors.
"""

from __future__ import annotations

from typing import Any

from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .images import EveImageConfig, EveImageProcessor

# The keys `ImageProcessingMixin` adds or reads that are not EVE image settings.
_HF_ONLY_KEYS = ("image_processor_type", "processor_class", "_processor_class")


class EveImageProcessorHF(BaseImageProcessor):
    """The EVE v1 / v2 image preprocessing as a transformers image processor.

    Calling it returns `{"images": [tensor [3, H, W], ...]}`: a list, not a stacked
    `pixel_values` tensor, because EVE keeps each image's own size (v2: any aspect ratio; v1: the
    valid band only), and "images" is the name `EveForCausalLM.forward` takes.
    """

    model_input_names = ["images"]

    def __init__(self, **kwargs: Any) -> None:
        settings = {k: v for k, v in kwargs.items() if k not in _HF_ONLY_KEYS}
        super().__init__()
        self.eve = EveImageProcessor(EveImageConfig.from_dict(settings))

    @classmethod
    def from_eve(cls, processor: EveImageProcessor) -> EveImageProcessorHF:
        """Wrap an existing `EveImageProcessor` (same settings)."""
        return cls(**processor.config.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json content: our settings, named so `AutoImageProcessor` finds this class."""
        return {**self.eve.config.to_dict(), "image_processor_type": type(self).__name__}

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """One float32 tensor [3, H, W] per image (paths, bytes, PIL images, data URLs)."""
        if return_tensors not in ("pt", None):
            raise ValueError(
                f"EveImageProcessorHF returns torch tensors only, got return_tensors={return_tensors!r}"
            )
        unknown = sorted(set(kwargs) - {"training"})
        if unknown:
            raise TypeError(f"EveImageProcessorHF.preprocess got unknown arguments {unknown}")
        return BatchFeature({"images": self.eve(images, training=kwargs.get("training"))})

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)
