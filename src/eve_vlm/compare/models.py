"""The three models of the study and the two stages each trains.

All three start from the same LLM (SmolLM2-135M-Instruct, the layers the quickstart keeps) and see
64 px images as a 4x4 grid of visual tokens; they differ only in where the tokens come from:

* ``eve_v1``: EVE v1's patch embedding (conv, local and global attention, projector), aligned in
  the first stage with the help of the patch aligning layer and its frozen teacher;
* ``eve_v2``: EVEv2's patch embedding and the decoder's vision copies (modality experts);
* ``encoder``: a frozen ImageNet EfficientNet-Lite0 (its stride-16 feature map) and a 2-layer MLP
  projector, LLaVA-style.

Stage "align" (captions) trains the vision side with the LLM frozen, as EVE's stage 1 and LLaVA's
stage 1 do; stage "sft" (questions) trains the vision side and the LLM (the tied embedding stays
frozen, as in the quickstart). The encoder's backbone stays frozen throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..train import Recipe

ModelFactory = Callable[[str], tuple[Any, Any]]  # kind -> (EveForCausalLM, EveProcessor), fresh

STAGES = ("align", "sft")
ALIGN_GROUPS = {"eve_v1": ["vision", "aligner"], "eve_v2": ["vision", "experts"], "encoder": ["vision"]}
SFT_GROUPS = {"eve_v1": ["vision", "llm"], "eve_v2": ["vision", "experts", "llm"], "encoder": ["vision", "llm"]}


def stage_recipe(kind: str, stage: str, *, version: str, data: Path, out: Path, steps: int, seed: int, cfg: Any,
                 warmup_steps: int | None = None) -> Recipe:
    """The recipe of `stage` for model `kind` (strictly parsed like any recipe file).

    Alignment decays its learning rate over its fixed length (cosine); fine-tuning keeps it
    constant after `warmup_steps`, so that the run can be stopped at any step and equals a run
    planned to stop there: one run serves both budgets and every point of the curve.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    model = {"version": version, **({"vision": "encoder"} if kind == "encoder" else {})}
    common: dict[str, Any] = {
        "name": f"compare-{kind}-{stage}", "model": model, "max_steps": steps, "seed": seed,
        "output_dir": str(out), "precision": "auto", "save_every": 0, "freeze": ["model.embed_tokens.*"],
    }
    if stage == "align":
        teacher = dict(cfg.v1_teacher) if kind == "eve_v1" else {"kind": "none"}
        groups = [g for g in ALIGN_GROUPS[kind] if g != "aligner" or teacher.get("kind", "none") != "none"]
        return Recipe.from_dict({
            **common, "stage": "prealign", "freeze": [],
            "data": {"path": str(data), "max_length": 128, "template": "plain"},
            "teacher": teacher,
            "optim": {"lr": cfg.align_lr, "group_lr": {g: cfg.align_lr for g in groups}, "warmup_ratio": 0.05},
            "trainable": groups, "global_batch_size": cfg.batch_size, "micro_batch_size": cfg.batch_size,
        })
    groups = SFT_GROUPS[kind]
    warmup = cfg.sft_warmup_steps if warmup_steps is None else warmup_steps
    group_lr = {g: (cfg.align_lr if g == "vision" else cfg.sft_lr) for g in groups}
    return Recipe.from_dict({
        **common, "stage": "sft",
        "data": {"path": str(data), "max_length": 512, "template": "chatml", "independent_turns": True,
                 "group_by_length": True},
        "optim": {"lr": cfg.sft_lr, "group_lr": group_lr, "schedule": "constant",
                  "warmup_ratio": min(1.0, warmup / max(steps, 1))},
        "trainable": groups, "global_batch_size": cfg.sft_batch_size, "micro_batch_size": cfg.sft_batch_size,
    })


def smollm2_factory(cfg: Any) -> ModelFactory:
    """Fresh models of each kind from SmolLM2-135M-Instruct (converted once, cached; no download)."""
    from ..quickstart.assets import smollm2_hf_folder
    from ..quickstart.easy_vqa_data import dataset_pixel_stats

    llm = smollm2_hf_folder()
    mean, std = dataset_pixel_stats("train")

    def build(kind: str) -> tuple[Any, Any]:
        return convert_smollm2(llm, kind, cfg, mean=mean, std=std)

    return build


def convert_smollm2(llm: Path, kind: str, cfg: Any, *, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Any, Any]:
    """One fresh model of `kind` from the LLM folder: 64 px images, a 4x4 grid of visual tokens.

    The EVE models normalise pixels with easy-VQA's own statistics (mostly white images; as the
    quickstart); the encoder keeps the processor's default normalisation, which it undoes to apply
    ImageNet's own (model.encoder_vision).
    """
    from ..conversion import convert_llm_folder
    from ..processing.images import EveImageConfig

    common = dict(template="chatml", seed=cfg.seed, keep_layers=list(cfg.keep_layers))
    if kind == "eve_v2":
        image_cfg = EveImageConfig(version="v2", max_size=64, patch_stride=8, dense_stride=2,
                                   image_mean=tuple(mean), image_std=tuple(std))
        return convert_llm_folder(llm, None, version="v2", vision_hidden_size=cfg.vision_hidden_size,
                                  image_config=image_cfg, **common)
    if kind == "eve_v1":
        image_cfg = EveImageConfig(version="v1", image_size=64, image_size_clip=64, patch_stride=8,
                                   patch_stride_clip=16, conv_stride=2, image_mean=tuple(mean), image_std=tuple(std))
        return convert_llm_folder(llm, None, version="v1", vision_hidden_size=cfg.vision_hidden_size,
                                  image_config=image_cfg, patch_activation="gelu", **common)
    if kind == "encoder":
        return convert_encoder(llm, cfg)
    raise ValueError(f"unknown model kind {kind!r}")


def convert_encoder(llm: Path, cfg: Any) -> tuple[Any, Any]:
    """The encoder-based baseline (model.encoder_vision) from the LLM folder: EfficientNet-Lite0's
    stride-16 feature map (ImageNet weights, frozen) is the 4x4 grid, one feature per token."""
    from ..conversion import convert_llm_folder
    from ..processing.images import EveImageConfig

    image_cfg = EveImageConfig(version="v1", image_size=64, image_size_clip=64, patch_stride=16,
                               patch_stride_clip=16, conv_stride=1)
    return convert_llm_folder(llm, None, version="v1", image_config=image_cfg, template="chatml", seed=cfg.seed,
                              keep_layers=list(cfg.keep_layers), vision="encoder",
                              vision_encoder="efficientnet-lite0", vision_encoder_stage="stride16")
