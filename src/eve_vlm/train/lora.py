"""LoRA fine-tuning through PEFT: the recipe's `lora:` section, adapter-only saving, merging.

PEFT does the work (adapters, saving only them, merging); this module picks the EVE modules to
adapt and keeps our checkpoint format for the merged model.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..model.eve import EveForCausalLM

logger = logging.getLogger(__name__)

# The decoder's attention and MLP projections; EVEv2's vision copies are `moe_`-prefixed
# (`self_attn.moe_q_proj`, `moe_mlp.gate_proj`).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


class LoraError(ValueError):
    """A `lora:` recipe section that cannot be applied to the model."""


@dataclass
class LoraSpec:
    """The recipe's `lora:` section. `target_modules` names projections (default: all attention
    and MLP ones; with `vision_copies`, EVEv2's vision copies too); `modules_to_save` names
    whole modules trained and saved in full next to the adapter (e.g. `model.vision_tower`)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    vision_copies: bool = True
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise LoraError(f"lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise LoraError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.target_modules) - set(DEFAULT_TARGETS))
        if unknown:
            raise LoraError(f"unknown lora.target_modules {unknown}: choose from {list(DEFAULT_TARGETS)}")
        if not self.target_modules:
            raise LoraError("lora.target_modules is empty")


def target_pattern(model: EveForCausalLM, spec: LoraSpec) -> str:
    """A regex over module names (PEFT matches it in full) for the decoder projections to adapt."""
    attn = [t for t in spec.target_modules if t in ATTENTION_PROJECTIONS]
    mlp = [t for t in spec.target_modules if t in MLP_PROJECTIONS]
    copies = spec.vision_copies and model.config.modality_experts
    prefix = "(moe_)?" if copies else ""
    parts = []
    if attn:
        parts.append(rf"self_attn\.{prefix}({'|'.join(attn)})")
    if mlp:
        parts.append(rf"{prefix}mlp\.({'|'.join(mlp)})")
    return rf"model\.layers\.\d+\.({'|'.join(parts)})"


def lora_config(model: EveForCausalLM, spec: LoraSpec) -> Any:
    """The `peft.LoraConfig` for `spec` on `model`."""
    from peft import LoraConfig

    names = {n for n, _ in model.named_modules()}
    for m in spec.modules_to_save:
        if m not in names:
            raise LoraError(f"lora.modules_to_save: the model has no module {m!r}")
    pattern = target_pattern(model, spec)
    if not any(re.fullmatch(pattern, n) and isinstance(mod, nn.Linear) for n, mod in model.named_modules()):
        raise LoraError(f"lora.target_modules {spec.target_modules} match no module of this model")
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=pattern,
        modules_to_save=list(spec.modules_to_save) or None,
        bias="none",
    )


def apply_lora(model: EveForCausalLM, spec: LoraSpec) -> Any:
    """Wrap `model` in a PEFT model: only the adapters (and `modules_to_save`) are trainable."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(model, spec))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA r=%d on %s: %d of %d parameters trainable", spec.r, spec.target_modules, trainable, total)
    return peft_model


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Merge the adapter saved in `adapter` into the checkpoint `base`; write the merged model (and
    the base's processor files) to `out` in our format."""
    import shutil

    from peft import PeftModel

    base, adapter, out = Path(base), Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no LoRA adapter (adapter_config.json) in {adapter}")
    model = EveForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():  # processor, tokenizer, generation config
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model") and f.suffix != ".bin":
            shutil.copy2(f, out / f.name)
    merged.save_pretrained(out)
    return out
