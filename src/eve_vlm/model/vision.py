"""Patch embedding layers: pixels -> visual tokens in LLM width, no vision encoder.

Both versions emit, per image, `[CLS, row_0 patches, SPLIT, row_1 patches, SPLIT, ...]`
(1 + h*(w+1) tokens). Images arrive already cropped to their valid region (no padding patches)
and may all have different sizes: images of equal shape are processed together, and the
stride-equals-kernel convolutions are computed as one matmul over unfolded patches.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EveConfig


def group_by_shape(images: list[Tensor]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        groups[tuple(img.shape)].append(i)
    return groups


def patchify(pixels: Tensor, patch: int) -> Tensor:
    """[n, C, H, W] -> [n, H/p, W/p, C*p*p] in the (c, ky, kx) order of a Conv2d weight."""
    n, c, h, w = pixels.shape
    x = pixels.view(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, h // patch, w // patch, c * patch * patch)


def conv_as_linear(conv: nn.Conv2d) -> tuple[Tensor, Tensor | None]:
    return conv.weight.reshape(conv.out_channels, -1), conv.bias


def window_view(grid: Tensor, stride: int) -> Tensor:
    """[n, H, W, C] -> [n, H/s, W/s, s*s, C]: the members of each s x s window, row-major."""
    n, h, w, c = grid.shape
    x = grid.view(n, h // stride, stride, w // stride, stride, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, h // stride, w // stride, stride * stride, c)


def layout_tokens(grid: Tensor, cls: Tensor, split: Tensor) -> Tensor:
    """[n, h, w, D] grid + per-image CLS [n, D] + SPLIT [D] -> [n, 1 + h*(w+1), D]."""
    n, h, w, d = grid.shape
    rows = torch.cat((grid, split.to(grid.dtype).expand(n, h, 1, d)), dim=2)
    return torch.cat((cls.unsqueeze(1).to(grid.dtype), rows.reshape(n, h * (w + 1), d)), dim=1)


class VisionOutput:
    """Concatenated visual tokens of all images plus their per-image grid sizes."""

    def __init__(self, tokens: Tensor, grids: list[tuple[int, int]]) -> None:
        self.tokens = tokens  # [sum_i 1 + h_i (w_i + 1), D]
        self.grids = grids  # (h, w) per image, input order

    @property
    def lengths(self) -> list[int]:
        return [1 + h * (w + 1) for h, w in self.grids]


class CrossAttention(nn.Module):
    """EVE v1's local/global attention block (official key names `q`, `kv`, `proj`).

    Scores are scaled by width**-0.5 (not head_dim**-0.5): an official quirk kept for weight
    compatibility.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = width**-0.5
        self.q = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width, bias=False))
        self.kv = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width, bias=False))
        self.proj = nn.Linear(width, width)

    def forward(self, query: Tensor, members: Tensor, residual: Tensor) -> Tensor:
        """query [..., C], members [..., K, C] -> residual + proj(attention over the K members)."""
        c = query.shape[-1]
        hd = c // self.heads
        q = self.q(query).unflatten(-1, (self.heads, hd))  # [..., H, hd]
        k, v = self.kv(members).split(c, dim=-1)
        k = k.unflatten(-1, (self.heads, hd))  # [..., K, H, hd]
        v = v.unflatten(-1, (self.heads, hd))
        scores = torch.einsum("...hd,...khd->...hk", q, k) * self.scale
        agg = torch.einsum("...hk,...khd->...hd", scores.softmax(dim=-1), v)
        return residual + self.proj(agg.flatten(-2))


class PatchEmbeddingV1(nn.Module):
    """14x14 conv, 2x2 pooling with local cross-attention, CLS with global attention, SPLIT tokens.

    With `patch_activation="gelu"` the conv gets a bias and a GELU (our option; official: linear).
    """

    def __init__(self, config: EveConfig) -> None:
        super().__init__()
        c, p = config.vision_hidden_size, config.patch_stride
        self.patch_stride, self.merge_stride = p, config.merge_stride
        self.activate = config.patch_activation == "gelu"
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=p, stride=p, bias=self.activate)
        self.class_embedding = nn.Parameter(torch.randn(c))
        self.split_embedding = nn.Parameter(torch.randn(c))
        self.local_attention = CrossAttention(c, config.vision_num_heads)
        self.global_attention = CrossAttention(c, config.vision_num_heads)

    def forward(self, images: list[Tensor]) -> VisionOutput:
        weight, bias = conv_as_linear(self.patch_embedding)
        per_image: list[Tensor | None] = [None] * len(images)
        grids: list[tuple[int, int]] = [(0, 0)] * len(images)
        for idx in group_by_shape(images).values():
            pixels = torch.stack([images[i] for i in idx]).to(weight.dtype)
            grid = F.linear(patchify(pixels, self.patch_stride), weight, bias)  # [n, H, W, C]
            if self.activate:
                grid = F.gelu(grid)
            members = window_view(grid, self.merge_stride)  # [n, h, w, s*s, C]
            pooled = members.mean(dim=3)
            local = self.local_attention(pooled, members, pooled)  # [n, h, w, C]
            n, h, w, c = local.shape
            cls_query = self.class_embedding.expand(n, c)
            cls = self.global_attention(cls_query, local.reshape(n, h * w, c), cls_query)
            tokens = layout_tokens(local, cls, self.split_embedding)
            for k, i in enumerate(idx):
                per_image[i] = tokens[k]
                grids[i] = (h, w)
        return VisionOutput(torch.cat(per_image, dim=0), grids)  # type: ignore[arg-type]


class PatchEmbeddingV2(nn.Module):
    """EVEv2's minimal patch embedding: conv(16), GELU, conv(2) straight to LLM width."""

    def __init__(self, config: EveConfig) -> None:
        super().__init__()
        c, d = config.vision_hidden_size, config.hidden_size
        self.patch_stride, self.merge_stride = config.patch_stride, config.merge_stride
        self.patch_embedding = nn.Sequential(
            nn.Conv2d(3, c, kernel_size=self.patch_stride, stride=self.patch_stride),
            nn.GELU(),
            nn.Conv2d(c, d, kernel_size=self.merge_stride, stride=self.merge_stride),
        )
        self.class_embedding = nn.Parameter(torch.randn(d))
        self.split_embedding = nn.Parameter(torch.randn(d))

    def forward(self, images: list[Tensor]) -> VisionOutput:
        w1, b1 = conv_as_linear(self.patch_embedding[0])
        w2, b2 = conv_as_linear(self.patch_embedding[2])
        s = self.merge_stride
        per_image: list[Tensor | None] = [None] * len(images)
        grids: list[tuple[int, int]] = [(0, 0)] * len(images)
        for idx in group_by_shape(images).values():
            pixels = torch.stack([images[i] for i in idx]).to(w1.dtype)
            grid = F.gelu(F.linear(patchify(pixels, self.patch_stride), w1, b1))  # [n, H, W, C]
            n, hh, ww, c = grid.shape
            # k=s=2 conv: gather each 2x2 window in (c, ky, kx) order, then one matmul.
            win = grid.view(n, hh // s, s, ww // s, s, c).permute(0, 1, 3, 5, 2, 4)
            merged = F.linear(win.reshape(n, hh // s, ww // s, c * s * s), w2, b2)  # [n, h, w, D]
            cls = self.class_embedding.expand(n, -1)
            tokens = layout_tokens(merged, cls, self.split_embedding)
            for k, i in enumerate(idx):
                per_image[i] = tokens[k]
                grids[i] = (merged.shape[1], merged.shape[2])
        return VisionOutput(torch.cat(per_image, dim=0), grids)  # type: ignore[arg-type]


def build_projector(config: EveConfig) -> nn.Module:
    """v1 projector (official `mm_projector_type`): linear, mlpNx_gelu or identity."""
    kind, c, d = config.projector_type, config.vision_hidden_size, config.hidden_size
    if kind == "linear":
        return nn.Linear(c, d)
    if kind == "identity":
        return nn.Identity()
    if kind.startswith("mlp") and kind.endswith("x_gelu"):
        depth = int(kind[3:-6])
        layers: list[nn.Module] = [nn.Linear(c, d)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(d, d)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown mm_projector_type {kind!r}")


def crop_official_layout(pixels: Tensor, patch_stride: int) -> list[Tensor]:
    """Official v1 tensors [B, 4, S, S] (RGB + valid mask) -> cropped [3, h, w] bands.

    Compatibility path for callers that feed the official square-padded layout; our processor
    already crops, so the hot path never sees padding.
    """
    out = []
    for img in pixels:
        mask = F.avg_pool2d(img[3:4], patch_stride)[0] > 0.5
        rows = mask.any(dim=1).nonzero().squeeze(1)
        cols = mask.any(dim=0).nonzero().squeeze(1)
        if rows.numel() == 0:
            raise ValueError("an official-layout image has an all-zero valid mask (a dummy image)")
        r0, r1 = int(rows[0]) * patch_stride, (int(rows[-1]) + 1) * patch_stride
        c0, c1 = int(cols[0]) * patch_stride, (int(cols[-1]) + 1) * patch_stride
        out.append(img[:3, r0:r1, c0:c1])
    return out
