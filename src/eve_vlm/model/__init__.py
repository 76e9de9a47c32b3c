"""The EVE model: one configurable decoder, the patch embeddings and the aligning layer.

`model/` builds and runs models and reads/writes their checkpoints; it never imports the
processing, training or quickstart layers (LLM conversion lives in `eve_vlm.conversion`).
"""

from .aligning import ClipTeacher, PatchAligningLayer, Teacher
from .checkpoint import CheckpointError
from .config import ConfigError, EveConfig
from .decoder import KVCache
from .eve import EveForCausalLM, EveOutput, next_token_targets

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
    "next_token_targets",
]
