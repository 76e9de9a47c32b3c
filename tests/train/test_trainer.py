"""The training system end to end on CPU: recipes, every tiny stage, trainable sets, chaining,
packing, exact resume, broken-record accounting and the `eve train` command.

Every stage runs once per session (12 steps of a tiny random model on generated shapes data,
about a second each) and the results are shared by the tests that inspect them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eve_vlm.data import (
    DataConfig,
    EveDataset,
    ReaderConfig,
    TooManyBrokenRecords,
    collate_packed,
    collate_padded,
    open_records,
    pack_examples,
)
from eve_vlm.model import EveForCausalLM
from eve_vlm.processing import EveProcessor
from eve_vlm.testing import draw_shape, generate_shapes_dataset
from eve_vlm.train import LrSchedule, Recipe, RecipeError, Trainer, TrainerCallback, latest_checkpoint
from eve_vlm.train.catalog import recipes_root

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = recipes_root()
ALL_RECIPES = sorted(RECIPES.rglob("*.yaml"))
FULL_RECIPES = sorted((RECIPES / "eve_v1").glob("*.yaml")) + sorted((RECIPES / "eve_v2").glob("*.yaml"))
V1_STAGES = ["1_prealign", "2_pretrain", "3_sft", "3_sft_hd"]
V2_STAGES = ["0_prealign", "1_vision", "1_vision_hd", "2_fullalign", "3_sft"]
STAGES = [f"eve_v1/{s}" for s in V1_STAGES] + [f"eve_v2/{s}" for s in V2_STAGES]


def tiny_recipe(stage: str, out: Path, *overrides: str) -> Recipe:
    return Recipe.load(RECIPES / "tiny" / f"{stage}.yaml", [f"output_dir={out}", *overrides])


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------- recipes
@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_loads_and_validates(path: Path) -> None:
    recipe = Recipe.load(path)
    assert recipe.trainable, "a stage must train something"
    assert recipe.global_batch_size % recipe.micro_batch_size == 0
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe  # round trip


@pytest.mark.parametrize("path", FULL_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_tiny_recipes_mirror_the_full_stages(path: Path) -> None:
    rel = path.relative_to(RECIPES)
    tiny_path = RECIPES / "tiny" / rel
    assert tiny_path.is_file(), f"no tiny version of {rel}"
    full, tiny = Recipe.load(path), Recipe.load(tiny_path)
    assert tiny.trainable == full.trainable
    assert tiny.stage == full.stage
    assert tiny.model.version == full.model.version
    assert tiny.model.init_vision_experts_from_text == full.model.init_vision_experts_from_text
    assert (tiny.teacher.kind == "none") == (full.teacher.kind == "none")


def test_every_stage_has_a_full_and_a_tiny_recipe() -> None:
    full = {str(p.relative_to(RECIPES).with_suffix("")) for p in FULL_RECIPES}
    tiny = {str(p.relative_to(RECIPES / "tiny").with_suffix("")) for p in (RECIPES / "tiny").rglob("*.yaml")}
    assert full == tiny == set(STAGES) | {"eve_v2/3_sft_lora"}  # LoRA: tests/train/test_lora.py


@pytest.mark.parametrize(
    "extra, name",
    [
        ("bogus_top: 1\n", "bogus_top"),
        ("optim:\n  lr: 0.1\n  lr_typo: 0.2\n", "lr_typo"),
        ("data:\n  pathh: x.jsonl\n", "pathh"),
        ("model:\n  tiny: true\n  versoin: v2\n", "versoin"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(tmp_path: Path, extra: str, name: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n" + extra)
    with pytest.raises(RecipeError, match=name):
        Recipe.load(path)


def test_unknown_override_key_and_bad_values_are_errors() -> None:
    path = RECIPES / "tiny/eve_v2/0_prealign.yaml"
    with pytest.raises(RecipeError, match="nonsense"):
        Recipe.load(path, ["data.nonsense=1"])
    with pytest.raises(RecipeError, match="bananas"):
        Recipe.load(path, ["trainable=[vision, bananas]"])
    with pytest.raises(RecipeError, match="optim.lr"):
        Recipe.load(path, ["optim.lr=fast"])
    with pytest.raises(RecipeError, match="key=value"):
        Recipe.load(path, ["optim.lr"])
    with pytest.raises(RecipeError, match="multiple of micro_batch_size"):
        Recipe.load(path, ["global_batch_size=6"])
    with pytest.raises(RecipeError, match="optim.schedule.*'cosin'"):
        Recipe.load(path, ["optim.schedule=cosin"])
    with pytest.raises(RecipeError, match="optim.decay_ratio"):
        Recipe.load(path, ["optim.decay_ratio=0"])
    with pytest.raises(RecipeError, match="teacher.cache_mb"):
        Recipe.load(path, ["teacher.cache_mb=-1"])


def test_lr_schedules_warm_up_then_hold_or_decay() -> None:
    steps = [LrSchedule(warmup=2, total=10, kind=s, decay_ratio=0.3) for s in ("cosine", "constant", "wsd")]
    cosine, constant, wsd = ([f(i) for i in range(10)] for f in steps)
    for lrs in (cosine, constant, wsd):
        assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:], strict=False))
    assert constant[2:] == [1.0] * 8
    # wsd: full rate until the last 30% (3 steps), then a linear decay towards zero
    assert wsd[2:7] == [1.0] * 5 and wsd[7:] == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_a_run_lengthened_before_its_decay_equals_one_planned_that_long(tmp_path: Path) -> None:
    """A callback resizing the schedule (as the quickstart's budget re-plan does): same learning
    rates and weights as a run given the new length from the start; refused once the decay has
    begun, and under cosine."""
    flat = ("optim.schedule=wsd", "optim.decay_ratio=0.5", "optim.warmup_ratio=0")
    planned = Trainer.from_recipe(tiny_recipe("eve_v2/2_fullalign", tmp_path / "planned", *flat, "max_steps=6"), progress=False)
    planned.train()

    class Lengthen(TrainerCallback):
        def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
            if record["step"] == 1:
                trainer.schedule.resize(6, trainer.state.step)

    replanned = Trainer.from_recipe(tiny_recipe("eve_v2/2_fullalign", tmp_path / "replanned", *flat, "max_steps=4"),
                                    callbacks=[Lengthen()], progress=False)
    replanned.train()
    assert replanned.state.step == 6
    assert [r["lr"] for r in replanned.state.history] == [r["lr"] for r in planned.state.history]
    assert [r["lr"] for r in planned.state.history][-3:] != [planned.state.history[0]["lr"]] * 3  # it did decay
    for name, value in planned.model.state_dict().items():
        torch.testing.assert_close(replanned.model.state_dict()[name], value, rtol=0, atol=0, msg=name)

    late = Trainer.from_recipe(tiny_recipe("eve_v2/2_fullalign", tmp_path / "late", *flat, "max_steps=4"), progress=False)
    late.train(stop_after=2)  # step 2 of 4: the decay (last 50%) has begun
    with pytest.raises(ValueError, match="only before its decay"):
        late.schedule.resize(8, late.state.step)
    cosine = Trainer.from_recipe(tiny_recipe("eve_v2/2_fullalign", tmp_path / "cos", "optim.schedule=cosine", "max_steps=4"), progress=False)
    with pytest.raises(ValueError, match="wsd or constant"):
        cosine.schedule.resize(8, cosine.state.step)


def test_overrides_set_nested_keys_with_yaml_types() -> None:
    r = Recipe.load(
        RECIPES / "eve_v2/1_vision.yaml",
        [
            "output_dir=/tmp/somewhere",
            "optim.lr=1e-4",  # YAML 1.1 reads this as a string: it must still become a float
            "optim.group_lr.vision=2.5e-4",
            "data.pack=true",
            "max_steps=7",
            "trainable=[vision, llm]",
            "model.init=runs/x/final",
            "model.extra.hidden_size=32",
            "optim.betas=[0.9, 0.95]",
        ],
    )
    assert r.output_dir == "/tmp/somewhere"
    assert r.optim.lr == pytest.approx(1e-4) and isinstance(r.optim.lr, float)
    assert r.optim.group_lr == {"vision": pytest.approx(2.5e-4)}
    assert r.data.pack is True
    assert r.max_steps == 7
    assert r.trainable == ["vision", "llm"]
    assert r.model.init == "runs/x/final"
    assert r.model.extra == {"hidden_size": 32}
    assert r.optim.betas == (0.9, 0.95)
    assert r.global_batch_size == 1024  # untouched fields keep the file's values


class CountingTeacher(torch.nn.Module):
    """A stand-in frozen teacher: features are a fixed function of the pixels; counts images seen."""

    image_size, patch_size, hidden_size = 4, 2, 3
    image_mean = image_std = (0.5, 0.5, 0.5)

    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        return pixels.unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)).permute(0, 2, 3, 1)  # [N, 2, 2, 3]


def test_cached_teacher_computes_each_image_once_and_equals_the_teacher() -> None:
    from eve_vlm.model.aligning import CachedTeacher

    inner = CountingTeacher()
    cached = CachedTeacher(inner, max_bytes=2**20)
    images = torch.rand(5, 3, 4, 4)
    batch = images[[0, 1, 0, 2, 1]]  # repeats inside one batch
    torch.testing.assert_close(cached(batch), CountingTeacher()(batch), rtol=0, atol=0)
    assert inner.images == 3 and (cached.hits, cached.misses) == (2, 3)
    torch.testing.assert_close(cached(images), CountingTeacher()(images), rtol=0, atol=0)
    assert inner.images == 5  # only images 3 and 4 were new
    assert (cached.image_size, cached.patch_size, cached.hidden_size) == (4, 2, 3)


def test_cached_teacher_forgets_the_least_recently_used_beyond_its_size() -> None:
    from eve_vlm.model.aligning import CachedTeacher

    inner = CountingTeacher()
    cached = CachedTeacher(inner, max_bytes=2 * 2 * 2 * 3 * 4)  # two images' features (2x2x3 fp32)
    a, b, c = (torch.full((1, 3, 4, 4), float(v)) for v in (1, 2, 3))
    cached(a), cached(b), cached(a)  # a is now the most recently used
    cached(c)  # evicts b
    seen = inner.images
    cached(a), cached(c)
    assert inner.images == seen
    cached(b)
    assert inner.images == seen + 1
    with pytest.raises(ValueError, match="max_bytes"):
        CachedTeacher(inner, 0)


def test_the_next_stage_reuses_a_cached_teacher_with_the_same_spec(tmp_path: Path) -> None:
    from eve_vlm.model.aligning import CachedTeacher

    first = Trainer.from_recipe(tiny_recipe("eve_v1/1_prealign", tmp_path / "a", "teacher.cache_mb=8", "max_steps=2"), progress=False)
    first.train()
    assert isinstance(first.teacher, CachedTeacher) and first.teacher.misses > 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["teacher_cache"]["misses"] == first.teacher.misses
    same = Trainer.from_recipe(tiny_recipe("eve_v1/2_pretrain", tmp_path / "b", "teacher.cache_mb=8", "max_steps=1"),
                   model=first.model, processor=first.processor, progress=False)
    assert same.teacher is first.teacher
    other = Trainer.from_recipe(tiny_recipe("eve_v1/2_pretrain", tmp_path / "c", "teacher.cache_mb=8", "teacher.loss_weight=2",
                                "max_steps=1"), model=first.model, processor=first.processor, progress=False)
    assert other.teacher is not first.teacher


# ---------------------------------------------------------------------- one run per tiny stage
@dataclass
class StageRun:
    trainer: Trainer
    out: Path
    init: dict[str, torch.Tensor]  # weights after Trainer setup, before the first step
    metrics: list[dict[str, Any]]


@pytest.fixture(scope="module")
def run_stage(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], StageRun]:
    cache: dict[str, StageRun] = {}

    def run(stage: str) -> StageRun:
        if stage not in cache:
            out = tmp_path_factory.mktemp(stage.replace("/", "-"))
            trainer = Trainer.from_recipe(tiny_recipe(stage, out), progress=False)
            init = state(trainer.model)
            trainer.train()
            cache[stage] = StageRun(trainer, out, init, read_metrics(out))
        return cache[stage]

    return run


@pytest.mark.parametrize("stage", STAGES)
def test_tiny_stage_lowers_the_loss_and_writes_its_outputs(run_stage, stage: str) -> None:
    run = run_stage(stage)
    metrics = run.metrics
    assert [m["step"] for m in metrics] == list(range(1, 13))
    for m in metrics:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(m)
        assert torch.isfinite(torch.tensor(m["loss"])) and m["tokens_per_s"] > 0
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    # warm-up then cosine decay: the lr never rises after its peak
    lrs = [m["lr"] for m in metrics]
    peak = lrs.index(max(lrs))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False)) and lrs[-1] < lrs[peak]

    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["samples"] == 96 and summary["tokens"] > 0
    assert summary["skipped_records"] == {} and summary["records_seen"] == 96
    assert (run.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    final = run.out / "final"
    model = EveForCausalLM.from_pretrained(final)
    processor = EveProcessor.from_pretrained(final)
    assert processor.version == run.trainer.recipe.model.version
    trained = run.trainer.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


@pytest.mark.parametrize("stage", [f"eve_v1/{s}" for s in V1_STAGES])
def test_v1_stages_report_the_aligning_loss(run_stage, stage: str) -> None:
    metrics = run_stage(stage).metrics
    align = [m["aligning_loss"] for m in metrics]
    assert all(a > 0 for a in align)
    for m in metrics:  # the reported loss is the LM loss plus the weighted aligning loss
        assert m["loss"] == pytest.approx(m["lm_loss"] + m["aligning_loss"])
    if stage.endswith("1_prealign"):
        assert sum(align[-3:]) / 3 < sum(align[:3]) / 3, align
    # the trained patch aligning layer is kept in the checkpoint for the next stage
    keys = load_file(str(run_stage(stage).out / "final/model.safetensors"))
    assert any(k.startswith("model.vision_tower_compressor.") for k in keys)


def test_v2_stages_have_no_aligning_loss(run_stage) -> None:
    assert all("aligning_loss" not in m for m in run_stage("eve_v2/0_prealign").metrics)


# ---------------------------------------------------------------------- trainable sets
def _vision(n: str) -> bool:
    return n.startswith(("model.vision_tower.", "model.mm_projector."))


def _aligner(n: str) -> bool:
    return n.startswith("model.vision_tower_compressor.")


def _experts(n: str) -> bool:
    return ".moe_" in n


EXPECTED_TRAINABLE: dict[str, Callable[[str], bool]] = {
    "eve_v1/1_prealign": lambda n: _vision(n) or _aligner(n),
    "eve_v1/2_pretrain": lambda n: True,
    "eve_v1/3_sft": lambda n: True,
    "eve_v1/3_sft_hd": lambda n: True,
    "eve_v2/0_prealign": lambda n: n.startswith("model.vision_tower."),
    "eve_v2/1_vision": lambda n: n.startswith("model.vision_tower.") or _experts(n),
    "eve_v2/1_vision_hd": lambda n: n.startswith("model.vision_tower.") or _experts(n),
    "eve_v2/2_fullalign": lambda n: True,
    "eve_v2/3_sft": lambda n: True,
}


@pytest.mark.parametrize("stage", STAGES)
def test_trainable_parameters_are_exactly_the_recipe_groups(run_stage, stage: str) -> None:
    run = run_stage(stage)
    model = run.trainer.model
    named = dict(model.named_parameters())
    expected = {n for n in named if EXPECTED_TRAINABLE[stage](n)}
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable == expected
    optimised = {id(p) for g in run.trainer.parts.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(named[n]) for n in expected}
    if stage.startswith("eve_v1"):  # the aligning layer is attached (and trains) in every v1 stage
        assert any(_aligner(n) for n in expected)

    final = model.state_dict()
    frozen = [n for n in run.init if n not in expected]
    for n in frozen:  # bit-identical: no weight decay, no stray update reaches a frozen tensor
        assert torch.equal(run.init[n], final[n]), f"frozen {n} changed"
    changed = [n for n in expected if not torch.equal(run.init[n], final[n])]
    assert len(changed) >= 0.9 * len(expected), sorted(set(expected) - set(changed))
    if stage == "eve_v1/1_prealign":
        assert all(n.startswith(("model.vision_tower", "model.mm_projector")) for n in changed)
        assert any(n.startswith("model.layers.") for n in frozen) and "lm_head.weight" in frozen


@pytest.mark.parametrize("stage", ["eve_v2/1_vision"])
def test_vision_experts_are_copied_from_text_before_training(run_stage, stage: str) -> None:
    run = run_stage(stage)
    on_disk = load_file(str(run.out / "init-tiny/model.safetensors"))
    moe = [n for n in run.init if ".moe_" in n]
    assert moe
    # the random init differs; the trainer's setup copies every text weight into its vision copy
    assert any(not torch.equal(on_disk[n], on_disk[n.replace("moe_", "")]) for n in moe)
    for n in moe:
        assert torch.equal(run.init[n], run.init[n.replace("moe_", "")]), n


def test_stage_chaining_final_folder_initialises_the_next_stage(run_stage, tmp_path: Path) -> None:
    prev = run_stage("eve_v2/0_prealign")
    final = prev.out / "final"
    trainer = Trainer.from_recipe(tiny_recipe("eve_v2/1_vision", tmp_path, f"model.init={final}", "model.tiny=false"), progress=False)
    init = state(trainer.model)
    assert not (tmp_path / "init-tiny").exists()  # no fresh random model was built
    done = prev.trainer.model.state_dict()
    for name, tensor in init.items():
        # vision copies are re-initialised from the text weights; everything else is stage 0's result
        source = name.replace("moe_", "") if ".moe_" in name else name
        assert torch.equal(tensor, done[source]), name
    trainer.train()
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    # the stage-0 patch embedding trains further, the text LLM stays as stage 0 left it
    after = trainer.model.state_dict()
    vision = [n for n in after if n.startswith("model.vision_tower.")]
    assert any(not torch.equal(after[n], done[n]) for n in vision)
    assert torch.equal(after["model.embed_tokens.weight"], done["model.embed_tokens.weight"])


# ---------------------------------------------------------------------- packing
def _mixed_records(folder: Path, n: int = 6) -> Path:
    """Conversation records with images of different aspect ratios, and one text-only record."""
    (folder / "images").mkdir(parents=True)
    sizes = [(64, 64), (96, 48), (40, 80), (64, 32), (128, 128), (50, 70)]
    colors, shapes = ["red", "green", "blue"], ["circle", "square", "triangle"]
    lines = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        draw_shape(colors[i % 3], shapes[i % 3], seed=i).resize((w, h)).save(folder / f"images/{i}.png")
        q = "What color is the shape?" if i % 2 else "What shape is in the image?"
        a = colors[i % 3] if i % 2 else shapes[i % 3]
        conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": f"A {a} one."}]
        lines.append({"id": str(i), "image": f"images/{i}.png", "conversations": conv})
    lines.append({"id": "text", "conversations": [{"from": "human", "value": "Is there a shape?"}, {"from": "gpt", "value": "yes"}]})
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.mark.parametrize("stage", ["eve_v1/3_sft", "eve_v2/3_sft"])
def test_packed_batch_gives_the_same_loss_and_gradients_as_padded(run_stage, tmp_path: Path, stage: str) -> None:
    final = run_stage(stage).out / "final"
    processor = EveProcessor.from_pretrained(final)
    path = _mixed_records(tmp_path)
    source = open_records(str(path), ReaderConfig(shuffle=False))
    examples = list(EveDataset(source, processor, DataConfig(max_length=512)))
    assert len(examples) == 7 and len({ex.images[0].shape for ex in examples if ex.images}) > 1
    rows = pack_examples(examples, max_length=512)
    assert len(rows) < len(examples)  # several samples really share a row
    pad = processor.pad_token_id

    def loss_and_grads(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = EveForCausalLM.from_pretrained(final)
        keys = ("input_ids", "attention_mask", "labels", "segment_ids")
        out = model(images=batch["images"], **{k: batch[k] for k in keys if k in batch})
        out.lm_loss_sum.backward()
        return out.lm_loss_sum.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    padded_loss, padded_grads = loss_and_grads(collate_padded(examples, pad))
    packed_loss, packed_grads = loss_and_grads(collate_packed(rows, pad))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-4)
    leaky = collate_packed(rows, pad)
    del leaky["segment_ids"]  # without segments attention crosses samples: the check is sensitive
    assert not torch.allclose(loss_and_grads(leaky)[0], padded_loss, rtol=1e-4)
    assert packed_grads.keys() == padded_grads.keys()
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_independent_turns_train_like_separate_single_turn_records(run_stage, tmp_path: Path) -> None:
    """data.independent_turns: a record's questions share the image prefix in one row and give
    the loss and gradients of the same questions as separate single-turn records."""
    final = run_stage("eve_v1/3_sft").out / "final"
    processor = EveProcessor.from_pretrained(final)
    (tmp_path / "images").mkdir()
    grouped, single = [], []
    for i, (color, shape) in enumerate([("red", "circle"), ("blue", "square")]):
        draw_shape(color, shape, seed=i).save(tmp_path / f"images/{i}.png")
        qa = [("What color is the shape?", color), ("Is there a circle?", "yes" if shape == "circle" else "no"),
              ("What shape is it?", shape)]
        turns = []
        for k, (q, a) in enumerate(qa):
            turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
            single.append({"id": f"{i}-{k}", "image": f"images/{i}.png",
                           "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
        grouped.append({"id": str(i), "image": f"images/{i}.png", "conversations": turns})

    def batch(records: list[dict], independent: bool) -> dict[str, Any]:
        path = tmp_path / f"r{len(records)}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in records))
        source = open_records(str(path), ReaderConfig(shuffle=False))
        examples = list(EveDataset(source, processor, DataConfig(max_length=512, independent_turns=independent)))
        return collate_padded(examples, processor.pad_token_id)

    def loss_and_grads(b: dict[str, Any]) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        model = EveForCausalLM.from_pretrained(final)
        keys = ("input_ids", "attention_mask", "labels", "branch_ids")
        out = model(images=b["images"], **{k: b[k] for k in keys if k in b})
        out.lm_loss_sum.backward()
        return out.lm_loss_sum.detach(), out.num_label_tokens, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    rows, apart = batch(grouped, True), batch(single, False)
    assert rows["input_ids"].shape[0] == 2 and rows["branch_ids"].max() == 3
    assert rows["attention_mask"].sum() < apart["attention_mask"].sum()  # the image is paid once per record
    joint, n_joint, g_joint = loss_and_grads(rows)
    ref, n_ref, g_ref = loss_and_grads(apart)
    assert n_joint == n_ref
    torch.testing.assert_close(joint, ref, rtol=1e-5, atol=1e-4)
    for name in g_ref:
        torch.testing.assert_close(g_joint[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)
    dialogue = loss_and_grads(batch(grouped, False))[0]  # as a dialogue later turns see earlier answers
    assert not torch.allclose(dialogue, ref, rtol=1e-3)


def test_loss_is_averaged_per_token_across_accumulation(tmp_path: Path) -> None:
    """Global batch 8 as 2 micro-batches of 4 or 1 of 8: same loss and same update."""
    runs = []
    for micro in (4, 8):
        out = tmp_path / f"micro{micro}"
        trainer = Trainer.from_recipe(tiny_recipe("eve_v2/2_fullalign", out, f"micro_batch_size={micro}", "max_steps=2"), progress=False)
        assert trainer.parts.accum == 8 // micro
        trainer.train()
        runs.append((read_metrics(out), trainer.model.state_dict()))
    (m4, w4), (m8, w8) = runs
    for a, b in zip(m4, m8, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for name in w4:
        torch.testing.assert_close(w4[name], w8[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------- checkpoints and resume
@pytest.mark.parametrize("stage", ["eve_v1/1_prealign", "eve_v2/2_fullalign"])
def test_killed_and_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path: Path, stage: str) -> None:
    a_out, b_out = tmp_path / "a", tmp_path / "b"
    a = Trainer.from_recipe(tiny_recipe(stage, a_out, "save_every=4"), progress=False)
    a.train()
    assert sorted(p.name for p in (a_out / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step-4", "step-8"]

    interrupted = Trainer.from_recipe(tiny_recipe(stage, b_out, "save_every=4"), progress=False)
    interrupted.train(stop_after=6)  # "killed" after step 6: the last checkpoint is step 4
    del interrupted
    ckpts = b_out / "checkpoints"
    assert latest_checkpoint(b_out) == ckpts / "step-4"
    assert not (b_out / "final").exists()
    # a crash mid-write leaves a temp folder; a step folder without trainer_state.json is incomplete
    shutil.copytree(ckpts / "step-4", ckpts / ".step-12.tmp-crashed")
    shutil.copytree(ckpts / "step-4", ckpts / "step-9")
    (ckpts / "step-9" / "trainer_state.json").unlink()
    assert latest_checkpoint(b_out) == ckpts / "step-4"

    resumed = Trainer.from_recipe(tiny_recipe(stage, b_out, "save_every=4"), progress=False)
    resumed.train(resume=True)
    final_a, final_b = a.model.state_dict(), resumed.model.state_dict()
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name
    on_disk_a = load_file(str(a_out / "final/model.safetensors"))
    on_disk_b = load_file(str(b_out / "final/model.safetensors"))
    assert all(torch.equal(on_disk_a[k], on_disk_b[k]) for k in on_disk_a)
    # the metrics of the resumed run continue the curve (steps logged after step 4 are replaced)
    ma, mb = read_metrics(a_out), read_metrics(b_out)
    assert [m["step"] for m in mb] == list(range(1, 13))
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    sa, sb = (json.loads((o / "summary.json").read_text()) for o in (a_out, b_out))
    assert (sa["samples"], sa["tokens"], sa["steps"]) == (sb["samples"], sb["tokens"], sb["steps"])


def test_resume_without_a_checkpoint_starts_fresh(tmp_path: Path) -> None:
    trainer = Trainer.from_recipe(tiny_recipe("eve_v2/0_prealign", tmp_path, "max_steps=2"), progress=False)
    assert latest_checkpoint(tmp_path) is None
    assert trainer.resume() is False and trainer.state.step == 0


def test_keep_checkpoints_prunes_old_ones(tmp_path: Path) -> None:
    Trainer.from_recipe(tiny_recipe("eve_v2/0_prealign", tmp_path, "save_every=2", "keep_checkpoints=2"), progress=False).train()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-10", "step-8"]
    assert json.loads((tmp_path / "checkpoints/step-10/trainer_state.json").read_text())["step"] == 10


# ---------------------------------------------------------------------- broken records
def _broken_manifest(folder: Path, good: int, copies: int = 1) -> Path:
    """`good` valid caption records with one of each kind of broken record (x copies) in the middle."""
    generate_shapes_dataset(folder, good, "caption", seed=3)
    lines = (folder / "caption.jsonl").read_text().splitlines()
    (folder / "images/corrupt.png").write_bytes(b"this is not a png")
    ok = json.loads(lines[0])
    broken = []
    for i in range(copies):
        broken += [
            json.dumps({**ok, "id": f"missing-{i}", "image": "images/does-not-exist.png"}),
            json.dumps({**ok, "id": f"corrupt-{i}", "image": "images/corrupt.png"}),
            '{"id": "bad json", "image": ',
            json.dumps({"id": f"no-answer-{i}", "image": ok["image"], "conversations": [{"from": "human", "value": "<image>"}]}),
        ]
    half = len(lines) // 2
    path = folder / "broken.jsonl"
    path.write_text("\n".join(lines[:half] + broken + lines[half:]) + "\n")
    return path


@pytest.mark.parametrize("max_steps, passes", [(5, 1), (10, 2)])
def test_broken_records_are_skipped_and_counted(tmp_path: Path, max_steps: int, passes: int) -> None:
    path = _broken_manifest(tmp_path / "data", good=40)
    recipe = tiny_recipe(
        "eve_v2/0_prealign", tmp_path / "run", f"data.path={path}", f"data.image_root={tmp_path / 'data'}",
        "data.shuffle=false", f"max_steps={max_steps}",  # 40 good records = 5 steps of 8: one pass each
    )
    Trainer.from_recipe(recipe, progress=False).train()
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    expected = {"missing_image": passes, "corrupt_image": passes, "bad_json": passes, "no_assistant_turn": passes}
    assert summary["skipped_records"] == expected  # counted over every pass, not only the last one
    assert summary["records_seen"] == 44 * passes
    assert summary["samples"] == 8 * max_steps


def test_too_many_broken_records_stop_the_run(tmp_path: Path) -> None:
    path = _broken_manifest(tmp_path / "data", good=40, copies=20)  # 80 broken of 120
    recipe = tiny_recipe(
        "eve_v2/0_prealign", tmp_path / "run", f"data.path={path}", f"data.image_root={tmp_path / 'data'}",
        "data.max_broken_fraction=0.1",
    )
    trainer = Trainer.from_recipe(recipe, progress=False)
    with pytest.raises(TooManyBrokenRecords, match=r"records are broken \(limit 10\.0%\).*max_broken_fraction"):
        trainer.train()
    assert not (tmp_path / "run/final").exists()


# ---------------------------------------------------------------------- the command line
def test_eve_train_command_runs_a_stage_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eve_vlm.cli import main

    recipe = str(RECIPES / "tiny/eve_v2/2_fullalign.yaml")
    args = ["train", recipe, "--set", f"output_dir={tmp_path}", "--set", "max_steps=4", "--set", "save_every=2"]
    assert main(args) == 0
    assert (tmp_path / "final/config.json").is_file()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "recipe.json").read_text())["max_steps"] == 4
    # --resume of the finished run says so and leaves it as it is
    assert main(args + ["--resume"]) == 0
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]
    # a longer run is another trajectory: refused, unless asked for; then it continues from step-4
    longer = args[:-4] + ["--set", "max_steps=6", "--set", "save_every=2", "--resume"]
    assert main(longer) == 2
    assert "max_steps: 4 -> 6" in capsys.readouterr().err
    assert main(longer + ["--allow-recipe-change"]) == 0
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 7))
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
    EveForCausalLM.from_pretrained(tmp_path / "final")
    assert Image.open(tmp_path / "loss.png").size[0] > 0


def test_freeze_patterns_hold_back_matching_parameters_and_tied_heads(tmp_path: Path) -> None:
    from eve_vlm.testing import make_tiny_checkpoint
    from eve_vlm.train import set_trainable

    path = make_tiny_checkpoint(tmp_path / "m", "v2", tie_word_embeddings=True)
    model = EveForCausalLM.from_pretrained(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    groups = set_trainable(model, ["vision", "llm"], ["lm_head.*"])  # the tied head freezes its embedding too
    assert not model.model.embed_tokens.weight.requires_grad
    trainable = {id(p) for ps in groups.values() for p in ps}
    assert id(model.model.embed_tokens.weight) not in trainable
    assert all(p.requires_grad for n, p in model.named_parameters() if "layers.0.mlp" in n)
    with pytest.raises(ValueError, match="no_such_param"):
        set_trainable(model, ["llm"], ["no_such_param*"])


def test_data_workers_resume_exactly_and_refuse_another_worker_count(tmp_path: Path) -> None:
    """With DataLoader workers the stream still replays exactly: an interrupted run resumed with the
    same workers ends at the uninterrupted run's weights; a different worker count is refused."""
    stage, workers = "eve_v2/2_fullalign", "data.num_workers=2"
    whole = Trainer.from_recipe(tiny_recipe(stage, tmp_path / "whole", workers, "max_steps=4"), progress=False)
    whole.train()
    part = Trainer.from_recipe(tiny_recipe(stage, tmp_path / "part", workers, "max_steps=4", "save_every=2"), progress=False)
    part.train(stop_after=3)  # checkpoint at step 2, then one more step that the resume replays
    resumed = Trainer.from_recipe(tiny_recipe(stage, tmp_path / "part", workers, "max_steps=4", "save_every=2"), progress=False)
    resumed.train(resume=True)
    assert resumed.state.step == 4
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert whole.state.history[-1]["loss"] == pytest.approx(resumed.state.history[-1]["loss"], abs=0)
    other = Trainer.from_recipe(tiny_recipe(stage, tmp_path / "part", "max_steps=4"), progress=False)
    with pytest.raises(ValueError, match="num_workers=2"):
        other.resume()
