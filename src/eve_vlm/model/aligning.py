"""EVE v1's patch aligning layer (training only) and the frozen teachers that supervise it.

The aligning layer reads LLM hidden states at visual patch positions from every 4th layer,
fuses them with a cross-attention over layers and regresses the teacher's patch features
with a cosine loss (named "mse" in the official code). It is never built for inference.

Differences from the official code (deliberate): only the needed layers at visual positions are
gathered (not a [B, N, 33, D] stack of all hidden states), any number of images per sample is
supported, and samples without images simply do not contribute (no zero-gradient dummy term).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class Teacher(Protocol):
    """A frozen module mapping teacher-ready pixels [N, 3, S, S] to patch features [N, g, g, C]."""

    image_size: int
    patch_size: int
    hidden_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def __call__(self, pixels: Tensor) -> Tensor: ...


def aligning_layer_indices(num_layers: int, rate: int = 4) -> list[int]:
    """Hidden-state indices (0 = embeddings, n = after the final norm): n, n-4, ..., >= 0."""
    return [num_layers - k for k in range(0, num_layers + 1, rate)]


class PatchAligningLayer(nn.Module):
    """Official `VisionCompressor` weights: norm_layer.J.{0: LayerNorm, 1: Linear}, input/output_layer."""

    def __init__(self, llm_width: int, teacher_width: int, num_layers: int, rate: int = 4, heads: int = 8):
        super().__init__()
        self.layer_idx = aligning_layer_indices(num_layers, rate)
        self.heads = heads
        self.scale = teacher_width**-0.5  # full width, as the official code
        self.norm_layer = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(llm_width), nn.Linear(llm_width, teacher_width, bias=False))
            for _ in self.layer_idx
        )
        self.input_layer = nn.Linear(llm_width, teacher_width)
        self.output_layer = nn.Linear(teacher_width, teacher_width)

    def forward(self, feats: Tensor) -> Tensor:
        """feats [T, len(layer_idx), D] (layer order of `layer_idx`) -> predictions [T, C]."""
        z = torch.stack([norm(feats[:, j]) for j, norm in enumerate(self.norm_layer)], dim=1)  # [T, J, C]
        t, j, c = z.shape
        if j > 1:
            hd = c // self.heads
            q = z[:, 0].view(t, self.heads, hd)
            kv = z[:, 1:].view(t, j - 1, self.heads, hd)
            attn = (torch.einsum("thd,tjhd->thj", q, kv) * self.scale).softmax(dim=-1)
            fused = torch.einsum("thj,tjhd->thd", attn, kv).reshape(t, c)
        else:
            fused = z.new_zeros(t, c)
        return self.input_layer(feats[:, 0]) + self.output_layer(fused)


def cosine_alignment_loss(pred: Tensor, target: Tensor, image_of_token: Tensor, num_images: int) -> Tensor:
    """Mean over images of (1 - mean cosine over that image's tokens)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
    per_image = torch.zeros(num_images, device=pred.device).index_add(0, image_of_token, cos)
    counts = torch.bincount(image_of_token, minlength=num_images).clamp(min=1)
    return (1 - per_image / counts).mean()


class ClipTeacher(nn.Module):
    """A Hugging Face `CLIPVisionModel` from a local folder as teacher (official EVE v1 teacher).

    Features are `hidden_states[select_layer]` without the CLS token (the penultimate layer by
    default), i.e. before the post-layernorm.
    """

    def __init__(self, model: nn.Module, select_layer: int = -2, mean=None, std=None) -> None:
        super().__init__()
        cfg = model.config
        self.model = model.eval().requires_grad_(False)
        self.select_layer = select_layer
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.hidden_size = cfg.hidden_size
        self.image_mean = tuple(mean or (0.48145466, 0.4578275, 0.40821073))
        self.image_std = tuple(std or (0.26862954, 0.26130258, 0.27577711))

    @classmethod
    def from_pretrained(cls, folder: str | Path, select_layer: int = -2) -> ClipTeacher:
        import json

        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(str(folder), dtype=torch.float32)
        mean = std = None
        pre = Path(folder, "preprocessor_config.json")
        if pre.is_file():
            data = json.loads(pre.read_text())
            mean, std = data.get("image_mean"), data.get("image_std")
        return cls(model, select_layer, mean, std)

    def train(self, mode: bool = True) -> ClipTeacher:  # the teacher is always frozen
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        out = self.model(pixel_values=pixels.to(next(self.model.parameters()).dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer][:, 1:]
        g = self.image_size // self.patch_size
        return feats.reshape(pixels.shape[0], g, g, -1)


class CachedTeacher(nn.Module):
    """A frozen teacher that keeps each image's features (keyed by its pixels) up to `max_bytes`.

    Why: a frozen teacher maps the same pixels to the same features, and a small data set shows
    every image several times (the quickstart: each image ~4 times over stages 1-2, the teacher
    ~8% of a step). Exact: a hit returns what the teacher computed for identical pixels. Least
    recently used features go first once the store is full.
    """

    def __init__(self, teacher: Teacher, max_bytes: int) -> None:
        super().__init__()
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.teacher = teacher
        self.max_bytes = max_bytes
        self.image_size, self.patch_size, self.hidden_size = teacher.image_size, teacher.patch_size, teacher.hidden_size
        self.image_mean, self.image_std = teacher.image_mean, teacher.image_std
        self._store: OrderedDict[bytes, Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def train(self, mode: bool = True) -> CachedTeacher:  # the teacher is always frozen
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        host = pixels.detach().to("cpu", torch.float32).contiguous()
        keys = [hashlib.blake2b(p.numpy().tobytes(), digest_size=16).digest() for p in host]
        first: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._store:
                first.setdefault(key, i)
        self.misses += len(first)
        self.hits += len(keys) - len(first)
        new: dict[bytes, Tensor] = {}
        if first:
            new = dict(zip(first, self.teacher(pixels[list(first.values())]), strict=True))
        out = torch.stack([new[key] if key in new else self._store[key] for key in keys])
        for key in keys:
            if key in self._store:
                self._store.move_to_end(key)
        for key, feat in new.items():
            self._put(key, feat.clone())  # a copy: a view would keep the whole batch's output alive
        return out

    def _put(self, key: bytes, feat: Tensor) -> None:
        size = feat.numel() * feat.element_size()
        self._store[key] = feat
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._store) > 1:
            _, old = self._store.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
