"""LoRA fine-tuning through PEFT: the recipe's `lora:` section (recipe.LoraSpec) on a model, merging.

PEFT does the work (adapters, saving only them, merging); this module picks the EVE modules to
adapt, decides what else trains (the builder calls `attach_lora`), and writes the merged model in
our checkpoint format. Checkpoints and final/ of a LoRA stage hold the adapter
(checkpointing.py, export.py).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..model.eve import EveForCausalLM
from .checkpointing import is_adapter_model
from .params import param_group_of
from .recipe import ATTENTION_PROJECTIONS, LORA_TARGETS, MLP_PROJECTIONS, LoraSpec, RecipeError

logger = logging.getLogger(__name__)

# The groups LoRA adapts instead of training them in full (train/params.py names the groups).
ADAPTED_GROUPS = ("llm", "experts")
DEFAULT_TARGETS = LORA_TARGETS


class LoraError(RecipeError):
    """A `lora:` recipe section that cannot be applied to the model."""


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


def lora_config(model: EveForCausalLM, spec: LoraSpec, frozen: list[str] | tuple[str, ...] = ()) -> Any:
    """The `peft.LoraConfig` for `spec` on `model`. Projections whose weight matches a `frozen`
    pattern (the recipe's `freeze`, fnmatch on parameter names) get no adapter: a stage that keeps
    early layers fixed keeps them fixed under LoRA too, and its backward pass still stops there."""
    from peft import LoraConfig

    names = {n for n, _ in model.named_modules()}
    for m in spec.modules_to_save:
        if m not in names:
            raise LoraError(f"lora.modules_to_save: the model has no module {m!r}")
    pattern = target_pattern(model, spec)
    hits = [n for n, mod in model.named_modules() if re.fullmatch(pattern, n) and isinstance(mod, nn.Linear)]
    if not hits:
        raise LoraError(f"lora.target_modules {spec.target_modules} match no module of this model")
    kept = [n for n in hits if not any(fnmatch.fnmatchcase(f"{n}.weight", f) for f in frozen)]
    if not kept:
        raise LoraError(f"every module lora.target_modules {spec.target_modules} picks is frozen by {list(frozen)}")
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        # PEFT matches a string in full as a regex, a list by name suffix: names when some are frozen
        target_modules=pattern if len(kept) == len(hits) else kept,
        modules_to_save=list(spec.modules_to_save) or None,
        bias="none",
    )


def apply_lora(model: EveForCausalLM, spec: LoraSpec, frozen: list[str] | tuple[str, ...] = ()) -> Any:
    """Wrap `model` in a PEFT model: only the adapters (and `modules_to_save`) are trainable."""
    try:
        from peft import get_peft_model
    except ImportError as exc:
        raise LoraError("a lora: section needs PEFT: pip install 'eve-vlm[lora]'") from exc

    peft_model = get_peft_model(model, lora_config(model, spec, frozen))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA r=%d on %s: %d of %d parameters trainable", spec.r, spec.target_modules, trainable, total)
    return peft_model


# The modules of the groups a LoRA stage may train in full and save with the adapter; v1's
# aligning layer (group "aligner") is training-only: it trains in full and goes into the
# checkpoints for resuming, never into final/.
GROUP_MODULES = {"vision": ("model.vision_tower", "model.mm_projector")}


def attach_lora(
    model: EveForCausalLM, spec: LoraSpec, groups: list[str], frozen: list[str]
) -> tuple[Any, dict[str, list[nn.Parameter]]]:
    """A recipe's LoRA set-up: adapters on the decoder; the vision group, when `groups` names it,
    becomes PEFT `modules_to_save` (trained in full, saved with the adapter), the aligner trains in
    full unsaved; parameters matching a `frozen` pattern stay fixed. Returns the PEFT model and its
    trainable parameters by group ("lora": the adapters and the recipe's own `modules_to_save`)."""
    names = {n for n, _ in model.named_modules()}
    full = [m for g in groups if g not in ADAPTED_GROUPS for m in GROUP_MODULES.get(g, ()) if m in names]
    spec = dataclasses.replace(spec, modules_to_save=list(dict.fromkeys([*spec.modules_to_save, *full])))
    peft_model = apply_lora(model, spec, frozen)
    out: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        plain = name.replace(".modules_to_save.default.", ".")  # a trained copy's original name
        if any(fnmatch.fnmatchcase(plain, f) for f in frozen):
            p.requires_grad_(False)
        elif param_group_of(plain) == "encoder" and "encoder" not in groups:
            p.requires_grad_(False)  # an encoder-based model's pretrained encoder: saved with the tower, frozen
        elif param_group_of(name) == "aligner" and "aligner" in groups:
            p.requires_grad_(True)
        if not p.requires_grad:
            continue
        if "lora_" in name or not any(plain.startswith(m + ".") for m in full) and param_group_of(name) != "aligner":
            out.setdefault("lora", []).append(p)
        else:
            out.setdefault(param_group_of(plain), []).append(p)
    if not out:
        raise LoraError(f"nothing to train: every adapter and module is frozen by {frozen}")
    return peft_model, out


def merged_model(model: Any) -> EveForCausalLM:
    """`model` with its adapters merged into the base weights (in place); a plain model as it is."""
    return model.merge_and_unload() if is_adapter_model(model) else model


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
