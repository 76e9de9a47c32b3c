"""Conversion: a Llama/Qwen2 LLM folder -> a fresh EVE model folder (model + processor)."""

from .llm import (
    check_llm_folder,
    config_from_llm,
    convert_llm,
    convert_llm_folder,
    default_image_config,
    format_layers,
    match_visual_scale,
    parse_layers,
    select_layers,
)

__all__ = [
    "check_llm_folder",
    "config_from_llm",
    "convert_llm",
    "convert_llm_folder",
    "default_image_config",
    "format_layers",
    "match_visual_scale",
    "parse_layers",
    "select_layers",
]
