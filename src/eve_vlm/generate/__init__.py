"""Generation: batched KV-cached decoding, sampling, streaming, and a one-call answer helper."""

from .answer import answer, build_prompts
from .core import GenerationResult, Step, TextDeltas, generate, iter_generate, stream_text
from .sampling import GenerationConfig

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "Step",
    "TextDeltas",
    "answer",
    "build_prompts",
    "generate",
    "iter_generate",
    "stream_text",
]
