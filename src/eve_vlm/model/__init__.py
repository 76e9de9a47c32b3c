"""The EVE model: one configurable decoder, the patch embeddings and the aligning layer."""

from .aligning import ClipTeacher, PatchAligningLayer, Teacher
from .checkpoint import CheckpointError, convert_llm
from .config import ConfigError, EveConfig
from .decoder import KVCache
from .eve import EveForCausalLM, EveOutput

__all__ = [
    "CheckpointError",
    "ClipTeacher",
    "ConfigError",
    "EveConfig",
    "EveForCausalLM",
    "EveOutput",
    "KVCache",
    "PatchAligningLayer",
    "Teacher",
    "convert_llm",
]
