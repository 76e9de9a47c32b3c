"""Image loading and the EVE v1 / v2 pixel preprocessing.

The resize rules reproduce the official ``process_images`` bit for bit (Python-double geometry,
Pillow's bicubic resize, a float64 ``x * (1/255)`` rescale cast to float32, then ``(x - mean) / std``
in float32), so the pixel tensors equal the official ones exactly. Unlike the official code, the
default v1 output is the *valid band only* (padding cropped away), so no padding patch ever reaches
the model; :func:`v1_official_layout` still builds the padded square + mask channel for parity checks.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255  # the float the HF image processors multiply by (in float64)
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"


class ImageError(ValueError):
    """An input could not be turned into a usable RGB image (the message says why)."""


# --------------------------------------------------------------------------------------------
# loading


def _open_source(source: Any) -> tuple[Image.Image, str]:
    """Open lazily (header only) and return the image with a short description of the source."""
    if isinstance(source, Image.Image):
        return source, "PIL image"
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, what = bytes(source), f"{len(source)} bytes"
    elif isinstance(source, str) and source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError("data URL must look like 'data:image/<type>;base64,<payload>'")
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"data URL has an invalid base64 payload: {exc}") from exc
        what = "data URL"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        data, what = path.read_bytes(), str(path)
    else:
        raise ImageError(f"unsupported image source type {type(source).__name__}")
    if not data:
        raise ImageError(f"empty image data ({what})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image has too many pixels ({what}): {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"not a readable image ({what}): {exc}") from exc
    return img, what


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparent pixels are composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16/32-bit greyscale: scale to 8 bit before converting (PIL would clip instead).
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        arr = np.clip(arr / hi * 255.0 if hi > 255 else arr, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def load_image(source: Any, *, max_pixels: int = 64_000_000) -> Image.Image:
    """Load ``source`` (path, bytes, base64 ``data:`` URL or PIL image) as a decoded RGB image.

    The pixel count is checked from the header before decoding, so decompression bombs are
    rejected without allocating them. Raises :class:`ImageError` for every bad input.
    """
    img, what = _open_source(source)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero width or height ({width}x{height}, {what})")
    if width * height > max_pixels:
        raise ImageError(
            f"image has too many pixels ({width}x{height} = {width * height} > max_pixels={max_pixels}, {what})"
        )
    try:
        img.load()
        rgb = _to_rgb(img)
        rgb.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"corrupt or truncated image data ({what}): {exc}") from exc
    return rgb


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class EveImageConfig:
    """EVE preprocessor fields for both versions (names as in the official preprocessor_config.json).

    v1 uses image_size / image_size_clip / patch_stride / patch_stride_clip / conv_stride;
    v2 uses max_size / patch_stride / dense_stride and ``resize_mode`` ("inference": always rescale
    to area ~max_size**2 with ceil, as the official eval code; "train": shrink only + round, as the
    official training code).
    """

    version: Literal["v1", "v2"] = "v2"
    # v1
    image_size: int | None = None
    image_size_clip: int | None = None
    patch_stride_clip: int | None = None
    conv_stride: int | None = None
    # v2
    max_size: int | None = None
    dense_stride: int | None = None
    # both
    patch_stride: int = 16
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resize_mode: Literal["inference", "train"] = "inference"
    # other keys of the config file (do_resize, resample, ...), written back by to_dict
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(x) for x in self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(float(x) for x in self.image_std)  # type: ignore[assignment]
        if self.version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {self.version!r}")
        if self.resize_mode not in ("inference", "train"):
            raise ValueError(f"resize_mode must be 'inference' or 'train', got {self.resize_mode!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (RGB)")
        needed = (
            ("image_size", "image_size_clip", "patch_stride_clip", "conv_stride")
            if self.version == "v1"
            else ("max_size", "dense_stride")
        )
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"EVE {self.version} image config is missing {missing}")
        if self.version == "v1":
            if self.image_size_clip % self.patch_stride_clip:
                raise ValueError(
                    f"image_size_clip={self.image_size_clip} must be a multiple of "
                    f"patch_stride_clip={self.patch_stride_clip}"
                )
            if self.image_size % self.image_size_clip:
                raise ValueError(
                    f"image_size={self.image_size} must be a multiple of image_size_clip={self.image_size_clip}"
                )

    @property
    def token_stride(self) -> int:
        """Pixels per visual token along each side."""
        if self.version == "v1":
            return self.patch_stride * self.conv_stride
        return self.patch_stride * self.dense_stride

    @property
    def ratio(self) -> int:
        """v1 only: image_size // image_size_clip (the official integer ratio)."""
        if self.version != "v1":
            raise AttributeError("ratio is defined for v1 configs only")
        return self.image_size // self.image_size_clip

    _V1_KEYS = ("image_size", "image_size_clip", "patch_stride", "patch_stride_clip", "conv_stride")
    _V2_KEYS = ("max_size", "patch_stride", "dense_stride")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EveImageConfig:
        """Read an official preprocessor_config.json dict (HF keys like do_resize are kept aside)."""
        d = dict(d)
        version = d.pop("eve_version", None)
        if version is None:
            if "max_size" in d or "dense_stride" in d:
                version = "v2"
            elif "image_size_clip" in d or "conv_stride" in d:
                version = "v1"
            else:
                raise ValueError(
                    "not an EVE preprocessor config: expected v1 keys (image_size, image_size_clip, "
                    "conv_stride, ...) or v2 keys (max_size, dense_stride, ...); got " + ", ".join(sorted(d))
                )
        keys = cls._V1_KEYS if version == "v1" else cls._V2_KEYS
        kwargs: dict[str, Any] = {k: int(d.pop(k)) for k in keys if k in d}
        for name in ("image_mean", "image_std"):
            if name in d:
                kwargs[name] = tuple(d.pop(name))
        if "resize_mode" in d:
            kwargs["resize_mode"] = d.pop("resize_mode")
        return cls(version=version, extra=d, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Official-style dict (readable by ``CLIPImageProcessor`` and by the official EVE code)."""
        out: dict[str, Any] = {
            "do_center_crop": False,
            "do_normalize": True,
            "do_resize": False,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "resample": 3,
        }
        out.update(self.extra)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        keys = self._V1_KEYS if self.version == "v1" else self._V2_KEYS
        out.update({k: getattr(self, k) for k in keys})
        out["eve_version"] = self.version
        # AutoImageProcessor reads this before feature_extractor_type: our wrapper, not CLIP's.
        out["image_processor_type"] = "EveImageProcessorHF"
        if self.version == "v2":
            out["resize_mode"] = self.resize_mode
        return out

    def replace(self, **changes: Any) -> EveImageConfig:
        d = asdict(self)
        d.update(changes)
        return EveImageConfig(**d)


# --------------------------------------------------------------------------------------------
# shared pixel arithmetic


def _normalize(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 HWC -> float32 CHW exactly as HF's CLIPImageProcessor rescale + normalize."""
    arr = np.asarray(img, dtype=np.uint8)
    x = (arr.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _resize(img: Image.Image, width: int, height: int) -> Image.Image:
    """Pillow's default filter for RGB (bicubic), as the official ``image.resize((w, h))``."""
    return img.resize((width, height), Image.Resampling.BICUBIC)


def _as_rgb(img: Image.Image) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise ImageError(f"expected a PIL image, got {type(img).__name__} (use load_image first)")
    return img if img.mode == "RGB" else _to_rgb(img)


@dataclass(frozen=True)
class BandGeometry:
    """Resize target and padding of the v1 square layout (all in pixels of the output square)."""

    size: int  # side of the square canvas
    width: int  # resized image width
    height: int  # resized image height
    pre: int  # padding before the band along the short axis
    wider: bool  # True: band is full width (padding above/below); False: full height

    @property
    def square(self) -> bool:
        return self.width == self.height

    @property
    def offset(self) -> tuple[int, int]:
        """(x, y) where the band is pasted."""
        return (0, self.pre) if self.wider else (self.pre, 0)


def band_geometry(width: int, height: int, size: int, patch: int, ratio: int = 1) -> BandGeometry:
    """The official v1 geometry: long side -> size, short side rounded UP to a multiple of patch.

    Evaluated in Python doubles left to right, like the official code, then scaled by ``ratio``.
    """
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero width or height ({width}x{height})")
    if size % patch:
        raise ValueError(f"size {size} must be a multiple of patch {patch}")
    wider = width > height
    if wider:
        v = math.ceil(size * height / width / patch)
        new_w, new_h = size, v * patch
    else:
        v = math.ceil(size * width / height / patch)
        new_w, new_h = v * patch, size
    pre = ((size // patch - v) // 2) * patch
    return BandGeometry(size * ratio, new_w * ratio, new_h * ratio, pre * ratio, wider)


def _v1_geometry(img: Image.Image, cfg: EveImageConfig) -> BandGeometry:
    if cfg.version != "v1":
        raise ValueError("this function needs a v1 image config")
    return band_geometry(img.width, img.height, cfg.image_size_clip, cfg.patch_stride_clip, cfg.ratio)


def _padded_layout(
    img: Image.Image, geo: BandGeometry, fill_mean: tuple[float, ...]
) -> tuple[Image.Image, torch.Tensor]:
    """Resize, paste onto a mean-coloured square canvas; return the canvas and its pixel mask."""
    resized = _resize(img, geo.width, geo.height)
    mask = torch.zeros(geo.size, geo.size, dtype=torch.float32)
    if geo.square:
        mask.fill_(1.0)
        return resized, mask
    canvas = Image.new("RGB", (geo.size, geo.size), tuple(int(m * 255) for m in fill_mean))
    canvas.paste(resized, geo.offset)
    x, y = geo.offset
    mask[y : y + geo.height, x : x + geo.width] = 1.0
    return canvas, mask


# --------------------------------------------------------------------------------------------
# v1


def v1_official_layout(img: Image.Image, cfg: EveImageConfig) -> torch.Tensor:
    """The official v1 ``process_images`` output: [4, S, S] (normalised RGB + valid-region mask)."""
    img = _as_rgb(img)
    canvas, mask = _padded_layout(img, _v1_geometry(img, cfg), cfg.image_mean)
    return torch.cat([_normalize(canvas, cfg.image_mean, cfg.image_std), mask[None]], dim=0)


def v1_pixels(img: Image.Image, cfg: EveImageConfig) -> torch.Tensor:
    """Only the valid band of :func:`v1_official_layout`: [3, h, w], no canvas, no padding."""
    img = _as_rgb(img)
    geo = _v1_geometry(img, cfg)
    return _normalize(_resize(img, geo.width, geo.height), cfg.image_mean, cfg.image_std)


def v1_teacher_layout(
    img: Image.Image,
    cfg: EveImageConfig | None = None,
    *,
    size: int | None = None,
    patch: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher input with the v1 geometry at ratio 1: (pixels [3, size, size], patch_mask [g, g] bool).

    Official: ``images_clip`` with size = image_size_clip, patch = patch_stride_clip, normalised by
    the teacher's processor. ``size``/``patch``/``mean``/``std`` default to the EVE config (CLIP
    values) and can be any teacher's (e.g. EfficientNet 224/16, mean = std = 0.5). The canvas is
    filled with the *teacher's* mean colour (identical to the official fill when both are CLIP).
    """
    img = _as_rgb(img)
    if size is None or patch is None:
        if cfg is None or cfg.version != "v1":
            raise ValueError("give size and patch, or a v1 config to take them from")
        size = cfg.image_size_clip if size is None else size
        patch = cfg.patch_stride_clip if patch is None else patch
    mean = tuple(mean) if mean is not None else (cfg.image_mean if cfg else CLIP_MEAN)
    std = tuple(std) if std is not None else (cfg.image_std if cfg else CLIP_STD)
    geo = band_geometry(img.width, img.height, size, patch)
    canvas, mask = _padded_layout(img, geo, mean)
    pixels = _normalize(canvas, mean, std)
    grid = size // patch
    patch_mask = mask.view(grid, patch, grid, patch).amin(dim=(1, 3)).bool()
    return pixels, patch_mask


# --------------------------------------------------------------------------------------------
# v2


def v2_output_size(
    width: int, height: int, cfg: EveImageConfig, *, training: bool | None = None
) -> tuple[int, int]:
    """(W, H) of the v2 pixel tensor; both multiples of token_stride, at least one stride.

    inference (official eval): scale = sqrt(w*h)/max_size always applied, sides rounded UP.
    train (official training): shrink only when scale > 1, sides rounded to nearest (Python round).
    """
    if cfg.version != "v2":
        raise ValueError("v2_output_size needs a v2 image config")
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero width or height ({width}x{height})")
    train = cfg.resize_mode == "train" if training is None else training
    m = cfg.token_stride
    scale = math.sqrt(width * height) / cfg.max_size
    if train:
        w, h = (width / scale, height / scale) if scale > 1 else (width, height)
        return max(round(w / m), 1) * m, max(round(h / m), 1) * m
    return max(math.ceil(width / scale / m), 1) * m, max(math.ceil(height / scale / m), 1) * m


def v2_pixels(img: Image.Image, cfg: EveImageConfig, *, training: bool | None = None) -> torch.Tensor:
    """v2 pixels [3, H, W] (no padding, no mask). ``training=None`` follows ``cfg.resize_mode``."""
    img = _as_rgb(img)
    width, height = v2_output_size(img.width, img.height, cfg, training=training)
    return _normalize(_resize(img, width, height), cfg.image_mean, cfg.image_std)


# --------------------------------------------------------------------------------------------
# token counts


def num_image_tokens(pixels: torch.Tensor, cfg: EveImageConfig) -> int:
    """Visual tokens for one image tensor [C, H, W]: 1 (CLS) + h * (w + 1) (one SPLIT per row)."""
    h, w = pixels.shape[-2] // cfg.token_stride, pixels.shape[-1] // cfg.token_stride
    return 1 + h * (w + 1)


def pixel_size(
    width: int, height: int, cfg: EveImageConfig, *, training: bool | None = None
) -> tuple[int, int]:
    """(W, H) of the tensor the processor makes for an image of this size (v1: the cropped band)."""
    if cfg.version == "v1":
        geo = band_geometry(width, height, cfg.image_size_clip, cfg.patch_stride_clip, cfg.ratio)
        return geo.width, geo.height
    return v2_output_size(width, height, cfg, training=training)


def num_image_tokens_for_size(
    width: int, height: int, cfg: EveImageConfig, *, training: bool | None = None
) -> int:
    """Visual token count for an image of this size without decoding it (for length-based samplers)."""
    w_px, h_px = pixel_size(width, height, cfg, training=training)
    return 1 + (h_px // cfg.token_stride) * (w_px // cfg.token_stride + 1)


# --------------------------------------------------------------------------------------------
# processor object


class EveImageProcessor:
    """Turns images into the per-image pixel tensors the EVE vision embedding consumes."""

    def __init__(self, config: EveImageConfig) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"EveImageProcessor({self.config!r})"

    def __call__(self, images: Any, *, training: bool | None = None) -> list[torch.Tensor]:
        """One [3, H, W] float32 tensor per image (v1: the cropped valid band)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for image in images:
            img = load_image(image)
            if self.config.version == "v1":
                out.append(v1_pixels(img, self.config))
            else:
                out.append(v2_pixels(img, self.config, training=training))
        return out

    def official_layout(self, images: Any) -> torch.Tensor:
        """v1 only: the official padded squares with mask channel, stacked [N, 4, S, S]."""
        if self.config.version != "v1":
            raise ValueError("official_layout exists for v1 only (v2 has no padding)")
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([v1_official_layout(load_image(i), self.config) for i in images])

    def num_image_tokens(self, pixels: torch.Tensor) -> int:
        return num_image_tokens(pixels, self.config)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> EveImageProcessor:
        path = Path(folder) / PREPROCESSOR_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {PREPROCESSOR_CONFIG_NAME} in {folder}")
        return cls(EveImageConfig.from_dict(json.loads(path.read_text())))

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / PREPROCESSOR_CONFIG_NAME
        path.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return path
