"""`eve quickstart`: a real pretrained LLM -> an encoder-free VLM on a CPU, end to end.

SmolLM2-135M-Instruct (its first layers) is converted into an EVE v1 model through the public
conversion path, trained through the three EVE stages on easy-VQA (captions for stages 1-2, its
questions for stage 3), and evaluated on held-out test images next to an answer prior and a blind
model trained on blank images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..conversion import format_layers
from ..model.config import PATCH_ACTIVATIONS
from ..train import Recipe, Trainer
from ..train.lora import merged_model
from .budget import RunningReplan
from .conversations import (
    EVAL_TURNS_PER_PAIR,
    dialogue_records,
    evaluate_conversations,
    held_out_conversations,
)

logger = logging.getLogger(__name__)

RECIPES = "quickstart"  # the shipped recipes quickstart/1_prealign ... quickstart/3_sft
STAGES = ("1_prealign", "2_pretrain", "3_sft")
STAGE3_TURNS = ("independent", "dialogue")
EASY_VQA_TEST_QUESTIONS = 9673  # what `eval_questions=0` (all of them) evaluates


@dataclass
class QuickstartConfig:
    out: Path = Path("runs/quickstart")
    variant: str = "v1"
    budget_minutes: float = 15.0
    # SmolLM2 layers kept (of 30): the first two and the last two. A plain prefix of layers leaves
    # the residual stream misaligned with the output head (text loss ~24 vs ~12 for first+last;
    # the full model: 3.6), and four layers keep a step affordable on two cores. The report says so.
    keep_layers: tuple[int, ...] = (0, 1, 28, 29)
    vision_hidden_size: int = 256
    # v1: a bias and GELU after the patch conv (EveConfig.patch_activation; the official conv is
    # linear). With the long stage 1 it lifts shape from ~60% to ~80-90% at the CPU budget; alone it
    # changes nothing (docs/quickstart.md). "none": the official layout.
    patch_activation: str = "gelu"
    eval_questions: int = 1000
    # Questions of one image per stage-3 sample (at most; an image's questions are split evenly).
    # "independent" turns (default): every question is its own single-turn sample, all sharing the
    # image prefix in one row, so the image's tokens are paid once per sample instead of once per
    # question, and nothing leaks between questions. "dialogue": one multi-turn conversation, where
    # later yes/no answers follow from earlier answers in the text ("What colour? red" ... "Is
    # there a red shape? yes"), so yes/no stays at the answer prior (measured: 85% yes/no with 4
    # per sample vs 95% with 1, at similar compute; docs/quickstart.md).
    questions_per_sample: int = 16
    stage3_turns: str = "independent"
    # Fraction of the training images that also get one multi-turn dialogue record in stage 3
    # (follow-up questions about one image, or a switch to a second image), so that `eve chat`
    # answers follow-ups and follows `/image` (quickstart/conversations.py). 0: none.
    dialogue_fraction: float = 0.3
    # Held-out conversations of each kind scored for the multi-turn accuracy (0: skip it).
    multiturn_conversations: int = 200
    blind: bool = True
    # Stage-3 steps of the blind model (at the 15-minute budget; scaled like the stages). Without the
    # image the best any model can do is the answer prior (the most common training answer of each
    # question string), and the blind model reaches it within ~60 steps: measured 68.2% overall at 60
    # steps and at 300, wandering 61-68% in between at the full learning rate (docs/quickstart.md,
    # "A short blind model"). Training it as long as stage 3 cost ~3 of the 15 minutes for nothing.
    blind_steps: int = 100
    seed: int = 0
    steps_scale: float | None = None  # default: from the budget (15 min -> 1.0)
    # Shorten stages 3 and 2 when the measured step times say the run would overrun the budget
    # (quickstart/budget.py). False: run the recipe steps whatever the wall time (sweeps, ablations).
    fit_budget: bool = True
    skip_stages: tuple[str, ...] = ()
    no_teacher: bool = False
    extra_steps: dict[str, int] | None = None  # stage -> steps added (ablations at equal compute)
    # recipe overrides, "key=value" for every stage or "STAGE:key=value" for one (e.g. "3_sft:optim.lr=1e-3")
    overrides: tuple[str, ...] = ()
    # Stages 1-2 captions are only "a <colour> <shape>": filler words ("on a plain white background")
    # cost tokens and output-head rows and dilute the per-token loss, but the leading "a" stays: with
    # it the colour is predicted at a text position that reads the image, the way stage 3's answers
    # are, and yes/no questions were learned (~90% after 450 stage-3 steps) where "<colour> <shape>"
    # left them at the answer prior (docs/quickstart.md, "Captions"). False: eight varied phrasings.
    short_captions: bool = True
    # Stage 3 as a LoRA fine-tune of the stage-2 model (STAGE3_LORA) instead of full fine-tuning;
    # the adapters are merged into final/.
    stage3_lora: bool = False

    def __post_init__(self) -> None:
        if self.questions_per_sample < 1:
            raise ValueError(f"questions_per_sample must be >= 1, got {self.questions_per_sample}")
        if self.stage3_turns not in STAGE3_TURNS:
            raise ValueError(f"stage3_turns must be one of {STAGE3_TURNS}, got {self.stage3_turns!r}")
        if self.patch_activation not in PATCH_ACTIVATIONS:
            raise ValueError(f"patch_activation must be one of {PATCH_ACTIVATIONS}, got {self.patch_activation!r}")
        if self.blind_steps < 1:
            raise ValueError(f"blind_steps must be >= 1, got {self.blind_steps}")
        if self.budget_minutes <= 0:
            raise ValueError(f"budget_minutes must be > 0, got {self.budget_minutes}")
        if not 0.0 <= self.dialogue_fraction <= 1.0:
            raise ValueError(f"dialogue_fraction must be in [0, 1], got {self.dialogue_fraction}")
        if self.multiturn_conversations < 0:
            raise ValueError(f"multiturn_conversations must be >= 0, got {self.multiturn_conversations}")

    @property
    def layers_text(self) -> str:
        return f"layers {format_layers(self.keep_layers)} of SmolLM2's 30"


def stage_recipe(stage: str, cfg: QuickstartConfig, overrides: list[str]) -> Recipe:
    """The shipped recipe of `stage`, composed for `cfg`: its overrides, steps scaled to the budget,
    the run's seed, and the variant's groups (v2 has no teacher; its vision copies train instead)."""
    lora = list(STAGE3_LORA) if cfg.stage3_lora and stage == "3_sft" else []
    recipe = Recipe.load(f"{RECIPES}/{stage}", [*lora, *stage_overrides(cfg.overrides, stage), *overrides])
    scale = cfg.steps_scale if cfg.steps_scale is not None else default_steps_scale(cfg.budget_minutes, stage)
    steps = max(2, int(round((recipe.max_steps or 10) * scale)))
    steps += int(round((cfg.extra_steps or {}).get(stage, 0) * scale))
    data = recipe.data
    if stage == "3_sft" and cfg.stage3_turns == "dialogue":  # the recipe file trains independent turns
        data = dataclasses.replace(data, independent_turns=False)
    trainable, group_lr, teacher = list(recipe.trainable), dict(recipe.optim.group_lr), recipe.teacher
    if cfg.variant == "v2":
        teacher = dataclasses.replace(teacher, kind="none")
        trainable = ["experts" if g == "aligner" else g for g in trainable]
        group_lr = {("experts" if k == "aligner" else k): v for k, v in group_lr.items()}
    if cfg.no_teacher:
        teacher = dataclasses.replace(teacher, kind="none")
        trainable = [g for g in trainable if g != "aligner"]
        group_lr.pop("aligner", None)
    return dataclasses.replace(
        recipe, max_steps=steps, seed=cfg.seed, data=data, teacher=teacher, trainable=trainable,
        optim=dataclasses.replace(recipe.optim, group_lr=group_lr),
    )


# `--stage3-lora`: rank-64 adapters on every attention and MLP projection of the layers stage 3
# trains (the recipe's `freeze` keeps the first two fixed, adapters included), at LoRA's higher
# learning rate; the output head and final norm stay as stage 2 left them.
STAGE3_LORA = ("lora.r=64", "lora.alpha=128", "lora.dropout=0.0", "optim.lr=1e-3", "optim.group_lr={}")


SHORT_CAPTION_TEMPLATES = ("a {color} {shape}",)

# How many more steps a GPU uses in the same budget than the 2-core CPU the recipe steps are set
# for, per stage: 720 / 1200 / 1344 steps. Stage 1 at 720 steps was measured on an H100 (shape 92%);
# stage 2 at 1200 steps was measured on an H100 too; stage 3's 1344 steps of ~33 questions are
# ~44k questions, past the ~30k at which yes/no reached 96-98% (H100 and CPU, docs/quickstart.md).
GPU_STEPS_FACTOR: dict[str, float] = {"1_prealign": 2.0, "2_pretrain": 20.0 / 3.0, "3_sft": 1344 / 1200}


def default_steps_scale(budget_minutes: float, stage: str, cuda: bool | None = None) -> float:
    """Multiplier on a stage's recipe steps for a wall-clock budget: the recipes fill 15 minutes on
    the 2-core CPU, and a GPU (used automatically when present) fits `GPU_STEPS_FACTOR` times more."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    return budget_minutes / 15.0 * (GPU_STEPS_FACTOR[stage] if cuda else 1.0)


def blind_model_steps(cfg: QuickstartConfig) -> int:
    """The blind model's stage-3 steps: `cfg.blind_steps` scaled like the stages, except that a GPU
    gets no more of them (the blind model has nothing left to learn after its first ~60)."""
    scale = cfg.steps_scale if cfg.steps_scale is not None else cfg.budget_minutes / 15.0
    return max(2, int(round(cfg.blind_steps * scale)))


def stage_overrides(overrides: tuple[str, ...] | list[str], stage: str) -> list[str]:
    """The overrides that apply to `stage`: unprefixed ones and those prefixed "`stage`:"."""
    picked = []
    for item in overrides:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if head not in STAGES:
                raise ValueError(f"override {item!r} names unknown stage {head!r}; stages: {', '.join(STAGES)}")
            if head == stage:
                picked.append(rest)
        else:
            picked.append(item)
    return picked


# ---------------------------------------------------------------------- data
def write_data(folder: Path, cfg: QuickstartConfig) -> dict[str, Path]:
    """Caption records (stages 1-2) and question records (stage 3, up to `questions_per_sample`
    about one image per record, an image's questions split evenly), train split only; the blind
    variant of the questions points every record at a blank image."""
    from .easy_vqa_data import CAPTION_TEMPLATES, caption_records, load_easy_vqa

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    templates = SHORT_CAPTION_TEMPLATES if cfg.short_captions else CAPTION_TEMPLATES
    captions = caption_records("train", captions_per_image=1, seed=cfg.seed, templates=templates)
    rng.shuffle(captions)
    train = load_easy_vqa("train")
    by_image: dict[int, list[Any]] = defaultdict(list)
    for q in train.questions:
        by_image[q.image_id].append(q)
    convs = []
    for image_id, qs in by_image.items():
        qs = list(qs)
        rng.shuffle(qs)
        n_chunks = -(-len(qs) // cfg.questions_per_sample)
        for part, chunk in enumerate(qs[k::n_chunks] for k in range(n_chunks)):
            turns = []
            for k, q in enumerate(chunk):
                turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q.text})
                turns.append({"from": "gpt", "value": q.answer})
            convs.append({"id": f"qa-{image_id}-{part}", "image": str(train.image_paths[image_id]), "conversations": turns})
    if cfg.dialogue_fraction > 0:
        convs += dialogue_records(train, cfg.dialogue_fraction, cfg.seed)
    rng.shuffle(convs)
    paths = {"captions": folder / "captions.jsonl", "qa": folder / "qa.jsonl"}
    for key, recs in (("captions", captions), ("qa", convs)):
        with paths[key].open("w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    blank = (folder / "blank.png").resolve()  # records name images absolutely: readers resolve relative paths against the manifest
    from PIL import Image

    Image.new("RGB", (64, 64), (255, 255, 255)).save(blank)
    blind = [dict(r, image=[str(blank)] * len(r["image"]) if isinstance(r["image"], list) else str(blank)) for r in convs]
    paths["qa_blind"] = folder / "qa_blind.jsonl"
    with paths["qa_blind"].open("w") as f:
        for r in blind:
            f.write(json.dumps(r) + "\n")
    return paths


# ---------------------------------------------------------------------- model
def build_model(llm: Path, cfg: QuickstartConfig):
    from ..conversion import convert_llm_folder
    from ..processing.images import EveImageConfig
    from .easy_vqa_data import dataset_pixel_stats

    mean, std = dataset_pixel_stats("train")
    # easy-VQA images are mostly white: normalising with the dataset's own statistics makes the
    # visual tokens of different images distinct (with CLIP statistics they are nearly identical).
    # Native 64 px, patch 8 with 2x2 merging: a 4x4 token grid (21 visual tokens in v1's layout),
    # matching the EfficientNet teacher's stride-16 grid at 64 px. An 8x8 grid (73 tokens) costs
    # ~3x more per sample and, in a 15-minute budget, left even colour at chance: the shape covers
    # 3-7% of the image and attention did not find it in time.
    if cfg.variant == "v1":
        image_cfg = EveImageConfig(
            version="v1", image_size=64, image_size_clip=64, patch_stride=8, patch_stride_clip=16, conv_stride=2,
            image_mean=tuple(mean), image_std=tuple(std),
        )
    else:
        image_cfg = EveImageConfig(
            version="v2", max_size=64, patch_stride=8, dense_stride=2, image_mean=tuple(mean), image_std=tuple(std)
        )
    model, processor = convert_llm_folder(
        llm,
        None,
        version=cfg.variant,
        vision_hidden_size=cfg.vision_hidden_size,
        image_config=image_cfg,
        template="chatml",
        seed=cfg.seed,
        keep_layers=list(cfg.keep_layers),
        **({"patch_activation": cfg.patch_activation} if cfg.variant == "v1" else {}),
    )
    return model, processor


# ---------------------------------------------------------------------- evaluation
def evaluate(model, processor, cfg: QuickstartConfig, *, blank: Path | None = None, batch_size: int = 32) -> dict[str, Any]:
    from PIL import Image

    from ..generate import answer
    from .easy_vqa_data import load_easy_vqa, normalize_answer

    test = load_easy_vqa("test")
    rng = random.Random(cfg.seed + 1)
    idx = list(range(len(test.questions)))
    rng.shuffle(idx)
    idx = sorted(idx[: cfg.eval_questions]) if cfg.eval_questions else idx
    model.eval()
    preds: dict[int, str] = {}
    blank_img = Image.open(blank).convert("RGB") if blank else None
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        qs = [test.questions[i] for i in chunk]
        imgs = [[blank_img if blank_img else Image.open(test.image_paths[q.image_id]).convert("RGB")] for q in qs]
        outs = answer(model, processor, ["<image>\n" + q.text for q in qs], imgs, max_new_tokens=4)
        preds.update(zip(chunk, outs, strict=True))
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for i, pred in preds.items():
        q = test.questions[i]
        ok = normalize_answer(pred) == normalize_answer(q.answer)
        per_type[q.question_type][0] += ok
        per_type[q.question_type][1] += 1
    total = sum(v[0] for v in per_type.values()), sum(v[1] for v in per_type.values())
    return {
        "accuracy": total[0] / max(total[1], 1),
        "per_type": {k: v[0] / max(v[1], 1) for k, v in sorted(per_type.items())},
        "count": total[1],
        "predictions": {int(i): p for i, p in preds.items()},
    }


def prior_accuracy(cfg: QuickstartConfig, indices: list[int]) -> dict[str, Any]:
    from .easy_vqa_data import answer_prior, load_easy_vqa, normalize_answer

    prior = answer_prior(load_easy_vqa("train"))
    test = load_easy_vqa("test")
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for i in indices:
        q = test.questions[i]
        per_type[q.question_type][0] += normalize_answer(prior.get(q.text, "yes")) == normalize_answer(q.answer)
        per_type[q.question_type][1] += 1
    total = sum(v[0] for v in per_type.values()), sum(v[1] for v in per_type.values())
    return {"accuracy": total[0] / max(total[1], 1), "per_type": {k: v[0] / v[1] for k, v in sorted(per_type.items())}}


# ---------------------------------------------------------------------- the run
def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    from .assets import smollm2_hf_folder

    t_start = time.perf_counter()
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    llm = smollm2_hf_folder()
    timings["llm_conversion"] = time.perf_counter() - t
    t = time.perf_counter()
    data = write_data(out / "data", cfg)
    model, processor = build_model(llm, cfg)
    timings["data_and_model"] = time.perf_counter() - t
    logger.info("EVE %s model: %.1fM parameters (%s)", cfg.variant, model.num_parameters() / 1e6, cfg.layers_text)

    histories: dict[str, list[dict[str, Any]]] = {}
    tokens_seen: dict[str, int] = {}
    steps: dict[str, int] = {}
    data_for = {"1_prealign": data["captions"], "2_pretrain": data["captions"], "3_sft": data["qa"]}
    stages = [s for s in STAGES if s not in cfg.skip_stages]
    planner = _planner(cfg, stages) if cfg.fit_budget else None
    for stage in stages:
        recipe = stage_recipe(stage, cfg, [f"output_dir={out / stage}", f"data.path={data_for[stage]}"])
        if planner is not None:
            recipe = dataclasses.replace(recipe, max_steps=planner.planned[stage])
        t = time.perf_counter()
        callbacks = []
        if planner is not None and stage == "3_sft" and recipe.optim.schedule in ("wsd", "constant"):
            callbacks.append(RunningReplan(planner, stage, stage_start=t, run_start=t_start))
        trainer = Trainer.from_recipe(recipe, model=model, processor=processor, callbacks=callbacks)
        result = trainer.train()
        model = merged_model(trainer.model)  # a LoRA stage's adapters merged into the weights
        if stage == "2_pretrain":
            model.detach_aligning_layer()  # training-only: never part of the released model
        timings[stage] = time.perf_counter() - t
        histories[stage] = result.history
        tokens_seen[stage] = trainer.state.tokens
        steps[stage] = trainer.max_steps
        if planner is not None:
            planner.record(stage, trainer.max_steps, timings[stage])
            planner.replan(time.perf_counter() - t_start)
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    if cfg.stage3_lora:  # 3_sft/final holds the adapter: final/ is the merged model
        model.save_pretrained(final)
        processor.save_pretrained(final)
    else:
        shutil.copytree(out / "3_sft" / "final", final)

    t = time.perf_counter()
    main = evaluate(model, processor, cfg)
    timings["eval"] = time.perf_counter() - t
    indices = sorted(main["predictions"])
    prior = prior_accuracy(cfg, indices)
    multiturn: dict[str, Any] | None = None
    if cfg.multiturn_conversations:
        from .easy_vqa_data import load_easy_vqa

        t = time.perf_counter()
        convs = held_out_conversations(load_easy_vqa("test"), cfg.multiturn_conversations, cfg.seed)
        multiturn = evaluate_conversations(model, processor, convs)
        timings["multiturn_eval"] = time.perf_counter() - t

    blind: dict[str, Any] | None = None
    if cfg.blind:
        t = time.perf_counter()
        blind_model, blind_proc = build_model(llm, cfg)
        recipe = stage_recipe("3_sft", cfg, [f"output_dir={out / 'blind'}", f"data.path={data['qa_blind']}"])
        recipe = dataclasses.replace(recipe, max_steps=blind_model_steps(cfg))  # never shortened by the planner
        trainer = Trainer.from_recipe(recipe, model=blind_model, processor=blind_proc)
        res = trainer.train()
        histories["blind_3_sft"] = res.history
        steps["blind"] = recipe.max_steps
        if planner is not None:
            planner.record("blind", recipe.max_steps, sum(h["seconds"] for h in res.history))
        blind = evaluate(merged_model(trainer.model), blind_proc, cfg, blank=out / "data" / "blank.png")
        timings["blind"] = time.perf_counter() - t

    wall = time.perf_counter() - t_start
    metrics = {
        "accuracy": main["accuracy"],
        "per_type": main["per_type"],
        "multiturn_accuracy": multiturn["accuracy"] if multiturn else None,
        "multiturn": multiturn,
        "blind_accuracy": blind["accuracy"] if blind else None,
        "blind_per_type": blind["per_type"] if blind else None,
        "prior_accuracy": prior["accuracy"],
        "prior_per_type": prior["per_type"],
        "eval_questions": main["count"],
        "wall_seconds": wall,
        "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
        "tokens_seen": tokens_seen,
        "steps": steps,
        "budget": planner.summary() if planner is not None else None,
        "questions_per_sample": cfg.questions_per_sample,
        "stage3_turns": cfg.stage3_turns,
        "dialogue_fraction": cfg.dialogue_fraction,
        "stage3": "lora " + ", ".join(STAGE3_LORA) if cfg.stage3_lora else "full fine-tuning",
        "patch_activation": cfg.patch_activation if cfg.variant == "v1" else "gelu (v2 built-in)",
        "llm_layers": list(cfg.keep_layers),
        "variant": cfg.variant,
        "device": str(model.device),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "predictions.json").write_text(json.dumps(main["predictions"]))
    plot_stages(histories, out / "loss.png")
    write_report(out, cfg, metrics, main)
    return metrics


def _planner(cfg: QuickstartConfig, stages: list[str]):
    from .budget import BudgetPlanner

    planned = {stage: stage_recipe(stage, cfg, []).max_steps for stage in stages}
    if cfg.blind:
        planned["blind"] = blind_model_steps(cfg)
    return BudgetPlanner(
        budget_seconds=cfg.budget_minutes * 60,
        steps=planned,
        eval_questions=cfg.eval_questions or EASY_VQA_TEST_QUESTIONS,
        evaluations=2 if cfg.blind else 1,
        extra_eval_questions=cfg.multiturn_conversations * EVAL_TURNS_PER_PAIR,
    )


def plot_stages(histories: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(4 * len(histories), 3.2), squeeze=False)
    for ax, (name, hist) in zip(axes[0], histories.items(), strict=True):
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["lm_loss"] for h in hist], label="LM loss")
        if hist and "aligning_loss" in hist[0]:
            ax.plot(steps, [h["aligning_loss"] for h in hist], label="aligning loss")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, cfg: QuickstartConfig, metrics: dict[str, Any], main: dict[str, Any]) -> None:
    from .easy_vqa_data import load_easy_vqa

    test = load_easy_vqa("test")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    rows = [("EVE (ours)", metrics["accuracy"], metrics["per_type"])]
    if metrics["blind_accuracy"] is not None:
        rows.append(("blind (blank images)", metrics["blind_accuracy"], metrics["blind_per_type"]))
    rows.append(("answer prior", metrics["prior_accuracy"], metrics["prior_per_type"]))
    lines = [
        "# eve-vlm quickstart report",
        "",
        f"SmolLM2-135M-Instruct ({cfg.layers_text}) turned into an encoder-free EVE "
        f"{cfg.variant} model and trained through stages 1-3 on easy-VQA train images; evaluated greedily on "
        f"{metrics['eval_questions']} questions about held-out test images.",
        "",
        "## Accuracy",
        "",
        "| model | overall | colour | shape | yes/no |",
        "|---|---|---|---|---|",
    ]
    for name, acc, per in rows:
        lines.append(f"| {name} | {pct(acc)} | {pct(per.get('color'))} | {pct(per.get('shape'))} | {pct(per.get('yes_no'))} |")
    mt = metrics.get("multiturn")
    if mt:
        kinds = mt["by_kind"]
        lines += [
            "",
            f"Multi-turn (held-out conversations, the model's own answers as history; {mt['count']} scored answers): "
            f"**{pct(mt['accuracy'])}** — follow-up questions 2-3 about one image {pct(kinds.get('follow_up'))}, "
            f"first question after switching to a new image {pct(kinds.get('image_switch'))}.",
        ]
    lines += ["", "## Settings and time", ""]
    lines.append(f"- device: {metrics['device']}; wall time {metrics['wall_seconds'] / 60:.1f} min")
    for k, v in metrics["timings_seconds"].items():
        lines.append(f"- {k}: {v:.0f} s")
    for k, v in metrics["tokens_seen"].items():
        lines.append(f"- tokens seen in {k}: {v:,}")
    lines.append(f"- recipes: {', '.join(f'{RECIPES}/{s}' for s in STAGES)} (`eve recipes --paths`; steps scaled by budget {cfg.budget_minutes} min)")
    lines.append("- steps: " + ", ".join(f"{k} {v}" for k, v in metrics["steps"].items()))
    budget = metrics.get("budget")
    if budget and budget["shortened"]:
        lines.append(
            f"- shortened to fit the budget: this machine ran at {budget['speed_factor']:.2f}x the reference step "
            "time, so the steps became " + ", ".join(f"{k} {v}" for k, v in budget["planned_steps"].items())
            + " (recipe: " + ", ".join(f"{k} {v}" for k, v in budget["recipe_steps"].items()) + ")"
        )
    if "blind" in metrics["steps"]:
        lines.append(
            f"- blind model: {metrics['steps']['blind']} stage-3 steps on blank images, from the converted LLM; "
            "without the image no model can beat the answer prior, which it reaches within ~60 steps"
        )
    lines.append(
        f"- stage-3 samples: up to {cfg.questions_per_sample} question(s) about one image each, as "
        + ("independent single-turn samples sharing the image prefix" if cfg.stage3_turns == "independent"
           else "one multi-turn dialogue")
        + (f"; plus multi-turn dialogues for {cfg.dialogue_fraction:.0%} of the images (follow-ups, image switches)"
           if cfg.dialogue_fraction else "")
    )
    lines.append(f"- stage 3: {metrics['stage3']}" + (" (adapters merged into final/)" if cfg.stage3_lora else ""))
    lines.append(f"- patch embedding: activation after the patch conv: {metrics['patch_activation']}")
    if cfg.overrides:
        lines.append(f"- recipe overrides: {', '.join(cfg.overrides)}")
    lines += ["", "![losses](loss.png)", "", "## Examples (held-out test images)", "", "| image | question | answer | truth |", "|---|---|---|---|"]
    (out / "examples").mkdir(exist_ok=True)
    for i in list(main["predictions"])[:12]:
        q = test.questions[int(i)]
        name = f"examples/{q.image_id}.png"
        shutil.copy(test.image_paths[q.image_id], out / name)
        lines.append(f"| ![]({name}) | {q.text} | {main['predictions'][i]} | {q.answer} |")
    lines += ["", f"Chat with the model: `eve chat --model {out / 'final'} --image IMAGE.png`", ""]
    (out / "report.md").write_text("\n".join(lines))
