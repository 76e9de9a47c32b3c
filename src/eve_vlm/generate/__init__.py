"""Generation: batched KV-cached decoding, sampling, streaming, and a one-call answer helper."""

from .answer import answer
from .core import GenerationResult, Step, generate, iter_generate, stream_text
from .prompts import build_prompts, with_image_placeholders
from .sampling import GenerationConfig
from .stopping import eos_token_ids, resolve_config
from .text import TextDeltas

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "Step",
    "TextDeltas",
    "answer",
    "build_prompts",
    "eos_token_ids",
    "generate",
    "iter_generate",
    "resolve_config",
    "stream_text",
    "with_image_placeholders",
]
