"""The released EVE models' image geometry (one table), and image-config resolution.

Released checkpoints point ``mm_vision_tower`` at relative ``openai/eve-*`` folders that are on no
hub (the v1 ones are not public at all), and their config.json does not store the patch geometry.
So the geometry lives here, in ``RELEASED_GEOMETRY``: the processor presets, LLM conversion's
defaults and the profiler's built-in 7B targets all read it, and a checkpoint's image config
resolves without depending on the working directory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .images import CLIP_MEAN, CLIP_STD, PREPROCESSOR_CONFIG_NAME, EveImageConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReleasedGeometry:
    """Image and patch geometry of one released EVE vision setting.

    ``resolution`` is v1's square ``image_size`` or v2's ``max_size`` (area ~ max_size**2).
    ``merge_stride`` is v1's ``conv_stride`` / v2's ``dense_stride``: one visual token per
    ``patch_stride * merge_stride`` pixels. v1 also resizes for its CLIP teacher
    (``clip_size`` / ``clip_patch_stride``).
    """

    version: Literal["v1", "v2"]
    resolution: int
    patch_stride: int
    merge_stride: int = 2
    vision_hidden_size: int = 1024
    clip_size: int | None = None
    clip_patch_stride: int | None = None

    def image_config(self, resolution: int | None = None) -> EveImageConfig:
        """The preprocessor config (CLIP normalisation), optionally at another resolution."""
        side = resolution or self.resolution
        if self.version == "v1":
            return EveImageConfig(
                version="v1",
                image_size=side,
                image_size_clip=self.clip_size,
                patch_stride=self.patch_stride,
                patch_stride_clip=self.clip_patch_stride,
                conv_stride=self.merge_stride,
                image_mean=CLIP_MEAN,
                image_std=CLIP_STD,
            )
        return EveImageConfig(
            version="v2",
            max_size=side,
            patch_stride=self.patch_stride,
            dense_stride=self.merge_stride,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )

    def model_fields(self) -> dict[str, Any]:
        """The EveConfig fields this geometry fixes (patch embedding strides and width)."""
        return {
            "patch_stride": self.patch_stride,
            "merge_stride": self.merge_stride,
            "vision_hidden_size": self.vision_hidden_size,
        }


# Keyed by the last path component of the released checkpoints' ``mm_vision_tower``.
RELEASED_GEOMETRY: dict[str, ReleasedGeometry] = {
    # EVE-7B / EVE-7B-HD: 14 px patches, 2x2 conv merge, CLIP ViT-L/14-336 teacher.
    "eve-patch14-anypixel-672": ReleasedGeometry("v1", 672, 14, clip_size=336, clip_patch_stride=14),
    "eve-patch14-anypixel-1344": ReleasedGeometry("v1", 1344, 14, clip_size=336, clip_patch_stride=14),
    # EVEv2: 16 px patches, 2x2 dense merge; 800 for the first vision stage, 1600 for the released 7B.
    "eve-anyratio-res800-patch16": ReleasedGeometry("v2", 800, 16),
    "eve-anyratio-res1600-patch16": ReleasedGeometry("v2", 1600, 16),
}

# The geometry a new model of each version gets unless told otherwise.
DEFAULT_PRESET: dict[str, str] = {"v1": "eve-patch14-anypixel-672", "v2": "eve-anyratio-res800-patch16"}


def released_geometry(name_or_version: str) -> ReleasedGeometry:
    """A table entry by preset name, or the default entry of a version ("v1" / "v2")."""
    name = DEFAULT_PRESET.get(name_or_version, name_or_version)
    try:
        return RELEASED_GEOMETRY[name]
    except KeyError:
        raise KeyError(
            f"unknown EVE geometry {name_or_version!r}; known: v1, v2, {', '.join(preset_names())}"
        ) from None


def preset_names() -> list[str]:
    return sorted(RELEASED_GEOMETRY)


def preset_for(mm_vision_tower: str) -> EveImageConfig | None:
    """Built-in config for a released ``mm_vision_tower`` value (matched on its last path component)."""
    geometry = RELEASED_GEOMETRY.get(Path(str(mm_vision_tower).rstrip("/\\")).name)
    return geometry.image_config() if geometry else None


def _read_config_file(path: Path) -> EveImageConfig:
    try:
        return EveImageConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"invalid EVE preprocessor config {path}: {exc}") from exc


def resolve_image_config(
    folder: str | os.PathLike, model_config: dict[str, Any] | None = None
) -> EveImageConfig:
    """Find a checkpoint's image config.

    Order: (1) ``preprocessor_config.json`` inside ``folder``; (2) the folder named by the model
    config's ``mm_vision_tower`` (absolute, or relative to ``folder``) if it holds one; (3) the
    built-in preset for that name. ``model_config`` defaults to ``folder/config.json``.
    """
    folder = Path(folder)
    looked: list[str] = []
    own = folder / PREPROCESSOR_CONFIG_NAME
    if own.is_file():
        return _read_config_file(own)
    looked.append(str(own))

    if model_config is None and (folder / "config.json").is_file():
        model_config = json.loads((folder / "config.json").read_text())
    tower = (model_config or {}).get("mm_vision_tower")
    if tower:
        tower_path = Path(tower)
        candidates = [tower_path] if tower_path.is_absolute() else [folder / tower_path]
        for cand in candidates:
            cfg_file = cand / PREPROCESSOR_CONFIG_NAME
            if cfg_file.is_file():
                logger.info("image config from mm_vision_tower folder %s", cand)
                return _read_config_file(cfg_file)
            looked.append(str(cfg_file))
        preset = preset_for(tower)
        if preset is not None:
            logger.info("image config from built-in preset %r", Path(tower).name)
            return preset
        looked.append(f"built-in preset named {Path(str(tower).rstrip('/')).name!r}")
    else:
        looked.append("mm_vision_tower in the model config (absent)")
    raise FileNotFoundError(
        "cannot find the EVE image preprocessor config; looked for: "
        + "; ".join(looked)
        + f". Known presets: {', '.join(preset_names())}"
    )
