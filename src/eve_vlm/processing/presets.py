"""Built-in preprocessor configs for the released EVE checkpoints, and config resolution.

Released checkpoints point ``mm_vision_tower`` at relative ``openai/eve-*`` folders that are not on
any hub (spec 7.1, flaw 11); the v1 ones are not public at all. We therefore ship the values
(spec 3.1 / 3.2) and resolve a checkpoint's image config without depending on the working directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .images import CLIP_MEAN, CLIP_STD, PREPROCESSOR_CONFIG_NAME, EveImageConfig

logger = logging.getLogger(__name__)


def _v1(image_size: int) -> EveImageConfig:
    return EveImageConfig(
        version="v1",
        image_size=image_size,
        image_size_clip=336,
        patch_stride=14,
        patch_stride_clip=14,
        conv_stride=2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def _v2(max_size: int) -> EveImageConfig:
    return EveImageConfig(
        version="v2",
        max_size=max_size,
        patch_stride=16,
        dense_stride=2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


PRESET_BUILDERS = {
    "eve-patch14-anypixel-672": lambda: _v1(672),
    "eve-patch14-anypixel-1344": lambda: _v1(1344),
    "eve-anyratio-res800-patch16": lambda: _v2(800),
    "eve-anyratio-res1600-patch16": lambda: _v2(1600),
}


def preset_names() -> list[str]:
    return sorted(PRESET_BUILDERS)


def preset_for(mm_vision_tower: str) -> EveImageConfig | None:
    """Built-in config for a released ``mm_vision_tower`` value (matched on its last path component)."""
    name = Path(str(mm_vision_tower).rstrip("/\\")).name
    builder = PRESET_BUILDERS.get(name)
    return builder() if builder else None


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
