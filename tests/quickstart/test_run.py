"""A reduced quickstart end to end (real SmolLM2, real EfficientNet teacher, real easy-VQA)."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("easy_vqa")
pytest.importorskip("efficientnet_lite_pytorch")


@pytest.fixture
def all_cores():
    """Other test modules pin torch to one thread at import; the quickstart is timed for all cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    yield
    torch.set_num_threads(saved)


@pytest.mark.slow
def test_reduced_quickstart(tmp_path, all_cores):
    from eve_vlm import EveForCausalLM, EveProcessor
    from eve_vlm.quickstart.run import QuickstartConfig, run_quickstart

    out = tmp_path / "qs"
    # 30% of the default CPU steps for stages 1-2 and the blind model, and of 300 stage-3 steps
    # (a few minutes on two cores): enough for colour to be learned. Fixed steps: no budget re-plan.
    cfg = QuickstartConfig(out=out, steps_scale=0.3, eval_questions=300, blind=True, fit_budget=False,
                           multiturn_conversations=40, overrides=("3_sft:max_steps=300",))
    metrics = run_quickstart(cfg)

    for name in ("report.md", "loss.png", "metrics.json", "final/config.json", "final/model.safetensors"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved["per_type"]) == set(saved["blind_per_type"]) == set(saved["prior_per_type"]) == {"color", "shape", "yes_no"}
    assert metrics["eval_questions"] == 300
    from eve_vlm.quickstart.run import STAGES, blind_model_steps, stage_recipe

    recipe_steps = {s: stage_recipe(s, cfg, []).max_steps for s in STAGES}
    assert recipe_steps["3_sft"] == round(300 * 0.3)  # an override sets the recipe's steps, which then scale
    assert saved["steps"] == {**recipe_steps, "blind": blind_model_steps(cfg)}
    assert saved["budget"] is None
    for stage in STAGES:  # each stage ran exactly its steps
        assert json.loads((out / stage / "summary.json").read_text())["steps"] == recipe_steps[stage]
    assert saved["questions_per_sample"] == 16 and saved["stage3_turns"] == "independent"
    assert saved["patch_activation"] == "gelu" and saved["dialogue_fraction"] == 0.3
    # Multi-turn: 40 follow-up conversations (questions 2 and 3 scored) and 40 image switches.
    mt = saved["multiturn"]
    assert mt["count"] == 40 * 2 + 40 and set(mt["by_kind"]) == {"follow_up", "image_switch"}
    assert saved["multiturn_accuracy"] == mt["accuracy"]
    # The image is used: colour + shape beat the blank-image model by a clear margin (at the full
    # default budget: 93.9% vs 29.2%; chance is 12.5% / 33%).
    seen = (saved["per_type"]["color"] + saved["per_type"]["shape"]) / 2
    blind = (saved["blind_per_type"]["color"] + saved["blind_per_type"]["shape"]) / 2
    assert seen > blind + 0.12, (saved["per_type"], saved["blind_per_type"])
    # Every stage lowered its loss.
    for stage in ("1_prealign", "2_pretrain", "3_sft"):
        losses = [json.loads(line)["loss"] for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert min(losses[-2:]) < losses[0], (stage, losses)
    # The model beats the answer prior on colour, which only the image can tell.
    assert saved["per_type"]["color"] > saved["prior_per_type"]["color"] + 0.3
    report = (out / "report.md").read_text()
    assert "| EVE (ours) |" in report and "answer prior" in report and "eve chat --model" in report
    assert "Multi-turn" in report
    # The final folder is what `eve chat` / `eve ask` load.
    EveForCausalLM.from_pretrained(out / "final")
    EveProcessor.from_pretrained(out / "final")


def test_layer_lists_parse_and_format():
    from eve_vlm.conversion import format_layers, parse_layers

    assert parse_layers("0-1,28-29") == (0, 1, 28, 29)
    assert format_layers((0, 1, 5, 28, 29)) == "0-1,5,28-29"
    with pytest.raises(ValueError, match="0-1,28-29"):
        parse_layers("first two")


def test_ablations_run_at_equal_compute(tmp_path):
    """Without stage 1, its steps go to stage 2; without the teacher, no aligner trains."""
    from eve_vlm.quickstart.ablations import ablation_configs
    from eve_vlm.quickstart.run import STAGES, QuickstartConfig, stage_recipe

    configs = ablation_configs(QuickstartConfig(out=tmp_path, steps_scale=0.5))
    assert set(configs) == {"full", "no_prealign", "no_teacher"}

    def steps(cfg):
        return sum(stage_recipe(s, cfg, []).max_steps for s in STAGES if s not in cfg.skip_stages)

    assert steps(configs["full"]) == steps(configs["no_prealign"]) == steps(configs["no_teacher"])
    assert not any(c.blind for c in configs.values())
    for stage in ("1_prealign", "2_pretrain"):
        recipe = stage_recipe(stage, configs["no_teacher"], [])
        assert recipe.teacher.kind == "none" and "aligner" not in recipe.trainable
        assert stage_recipe(stage, configs["full"], []).teacher.kind == "efficientnet"


def test_stage_overrides_pick_their_stage_and_reject_unknown_ones():
    from eve_vlm.quickstart.run import QuickstartConfig, stage_overrides, stage_recipe

    items = ("optim.lr=0.01", "3_sft:max_steps=7", "1_prealign:optim.warmup_ratio=0.5", "data.path=c:/x.jsonl")
    assert stage_overrides(items, "3_sft") == ["optim.lr=0.01", "max_steps=7", "data.path=c:/x.jsonl"]
    assert stage_overrides(items, "2_pretrain") == ["optim.lr=0.01", "data.path=c:/x.jsonl"]
    with pytest.raises(ValueError, match="4_rlhf"):
        stage_overrides(("4_rlhf:max_steps=1",), "3_sft")
    cfg = QuickstartConfig(steps_scale=1.0, overrides=("3_sft:max_steps=7", "optim.warmup_ratio=0.5"))
    assert stage_recipe("3_sft", cfg, []).max_steps == 7
    assert stage_recipe("2_pretrain", cfg, []).optim.warmup_ratio == 0.5


def test_a_gpu_fits_more_steps_into_the_same_budget(monkeypatch):
    from eve_vlm.quickstart.run import (
        GPU_STEPS_FACTOR,
        STAGES,
        QuickstartConfig,
        blind_model_steps,
        default_steps_scale,
        stage_recipe,
    )

    assert default_steps_scale(15.0, "3_sft", cuda=False) == 1.0
    assert default_steps_scale(7.5, "1_prealign", cuda=False) == 0.5
    assert default_steps_scale(15.0, "3_sft", cuda=True) == pytest.approx(GPU_STEPS_FACTOR["3_sft"])
    assert set(GPU_STEPS_FACTOR) == set(STAGES) and all(f > 1 for f in GPU_STEPS_FACTOR.values())
    cfg = QuickstartConfig()  # no steps_scale: from the budget and the device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = {s: stage_recipe(s, cfg, []).max_steps for s in STAGES}
    assert cpu == {"1_prealign": 360, "2_pretrain": 180, "3_sft": 1200}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = {s: stage_recipe(s, cfg, []).max_steps for s in STAGES}
    assert gpu == {s: round(cpu[s] * GPU_STEPS_FACTOR[s]) for s in STAGES}
    assert gpu == {"1_prealign": 720, "2_pretrain": 1200, "3_sft": 1344}
    assert blind_model_steps(cfg) == 100  # the blind model has nothing more to learn on a GPU
    assert blind_model_steps(QuickstartConfig(steps_scale=0.5)) == 50
    with pytest.raises(ValueError, match="blind_steps"):
        QuickstartConfig(blind_steps=0)


def test_stage3_samples_group_an_images_questions_as_independent_turns(tmp_path):
    """Up to 16 questions about one image per record, trained as independent single-turn samples
    sharing the image prefix (as a dialogue, later answers could be read off earlier ones)."""
    from collections import Counter

    from eve_vlm.quickstart.easy_vqa_data import load_easy_vqa
    from eve_vlm.quickstart.run import QuickstartConfig, stage_recipe, write_data

    train = load_easy_vqa("train")
    paths = write_data(tmp_path, QuickstartConfig(dialogue_fraction=0.0))
    records = [json.loads(line) for line in paths["qa"].read_text().splitlines()]
    per_image = Counter(q.image_id for q in train.questions)
    assert len(records) == sum(-(-n // 16) for n in per_image.values())
    assert sum(len(r["conversations"]) // 2 for r in records) == len(train.questions)
    sizes = Counter(r["image"] for r in records)
    assert max(len(r["conversations"]) // 2 for r in records) <= 16 and len(sizes) == len(per_image)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)
    assert all("<image>" not in t["value"] for r in records for t in r["conversations"][1:])
    blind = [json.loads(line) for line in paths["qa_blind"].read_text().splitlines()]
    assert {r["image"] for r in blind} == {str(tmp_path / "blank.png")} and len(blind) == len(records)
    assert stage_recipe("3_sft", QuickstartConfig(), []).data.independent_turns
    assert not stage_recipe("3_sft", QuickstartConfig(stage3_turns="dialogue"), []).data.independent_turns
    with pytest.raises(ValueError, match="questions_per_sample"):
        QuickstartConfig(questions_per_sample=0)
    with pytest.raises(ValueError, match="stage3_turns"):
        QuickstartConfig(stage3_turns="chat")
    single = write_data(tmp_path / "one", QuickstartConfig(questions_per_sample=1, dialogue_fraction=0.0))
    assert sum(1 for _ in single["qa"].open()) == len(train.questions)


def test_frozen_embedding_recipe_keeps_the_tied_head_fixed():
    from eve_vlm.quickstart.run import QuickstartConfig, stage_recipe

    assert stage_recipe("2_pretrain", QuickstartConfig(steps_scale=1.0), []).freeze == ["model.embed_tokens.*"]
    # stage 3 also keeps the patch embedding and the first two decoder layers as stages 1-2 left them
    sft = stage_recipe("3_sft", QuickstartConfig(steps_scale=1.0), [])
    assert sft.freeze == ["model.embed_tokens.*", "model.layers.0.*", "model.layers.1.*"]
    assert sft.trainable == ["llm"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "4_rlhf:max_steps=1"], "unknown stage '4_rlhf'"),
        (["--set", "optim.lr=fast"], "optim.lr"),
        (["--questions-per-sample", "0"], "questions_per_sample"),
        (["--blind-steps", "0"], "blind_steps"),
        (["--layers", "first"], "0-1,28-29"),
    ],
)
def test_bad_quickstart_flags_fail_at_once_in_one_line(tmp_path, capsys, flags, message):
    from eve_vlm.cli import main

    assert main(["quickstart", "--out", str(tmp_path / "qs"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eve: error:") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "qs").exists()  # nothing was set up


def test_captions_are_short_by_default_and_varied_on_request(tmp_path):
    import re

    from eve_vlm.quickstart.run import QuickstartConfig, write_data

    def captions(cfg, folder):
        lines = write_data(folder, cfg)["captions"].read_text().splitlines()
        return [json.loads(line)["conversations"][1]["value"] for line in lines]

    short = captions(QuickstartConfig(), tmp_path / "short")
    assert len(short) == 4000 and all(re.fullmatch(r"a [a-z]+ (circle|rectangle|triangle)", c) for c in short)
    varied = captions(QuickstartConfig(short_captions=False), tmp_path / "varied")
    assert len(set(c.split(" ", 3)[-1] for c in varied)) > 8  # several phrasings, not one


def test_patch_activation_flag_reaches_the_config():
    import argparse

    from eve_vlm.quickstart.cli import _config, register
    from eve_vlm.quickstart.run import QuickstartConfig

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert _config(parser.parse_args(["quickstart"])).patch_activation == "gelu"
    assert _config(parser.parse_args(["quickstart", "--patch-activation", "none"])).patch_activation == "none"
    assert _config(parser.parse_args(["quickstart"])).blind_steps == QuickstartConfig().blind_steps == 100
    assert _config(parser.parse_args(["quickstart", "--blind-steps", "40"])).blind_steps == 40
    with pytest.raises(SystemExit):
        parser.parse_args(["quickstart", "--patch-activation", "relu"])
    with pytest.raises(ValueError, match="patch_activation"):
        QuickstartConfig(patch_activation="relu")


def test_stage3_length_follows_the_running_replan_until_its_decay(tmp_path):
    """The quickstart's stage-3 callback applies the planner's new length every `every` steps,
    ends no sooner than the wsd schedule allows, and stops re-planning once the decay has begun."""
    from eve_vlm.quickstart.budget import RunningReplan
    from eve_vlm.train import Recipe, Trainer

    recipe = Recipe.load(
        "tiny/eve_v2/2_fullalign",
        [f"output_dir={tmp_path}", "max_steps=12", "optim.schedule=wsd", "optim.decay_ratio=0.5", "optim.warmup_ratio=0"],
    )

    class ScriptedPlanner:
        planned = {"3_sft": 12}
        asked: list[int] = []

        def replan_running(self, phase, done, seconds, elapsed):
            self.asked.append(done)
            return {5: 30, 10: 4}[done]  # longer at step 5; at step 10 far shorter than the schedule allows

    planner = ScriptedPlanner()
    replan = RunningReplan(planner, "3_sft", stage_start=0.0, run_start=0.0, every=5)
    trainer = Trainer.from_recipe(recipe, callbacks=[replan], progress=False)
    trainer.train()
    # step 10 is the last flat step for 21 steps (decay: the last round(0.5 * 21) = 10)
    assert planner.asked == [5, 10] and trainer.state.step == 21 == planner.planned["3_sft"]
    lrs = [r["lr"] for r in trainer.state.history]
    assert lrs[:12] == [lrs[0]] * 12 and lrs[12] < lrs[0]  # flat, then the decay over the new length


def test_stage3_mixes_in_dialogues_about_one_image_and_across_an_image_switch(tmp_path):
    """The default adds one dialogue record for 30% of the images: 40% follow-up questions about
    one image, the rest a switch to a second image; each trains as one dialogue, its placeholders
    where the images arrive; the blind data blanks every image of a record."""
    from eve_vlm.data import record_from_dict
    from eve_vlm.quickstart.conversations import SAME_IMAGE_TURNS, SWITCH_TURNS
    from eve_vlm.quickstart.easy_vqa_data import load_easy_vqa
    from eve_vlm.quickstart.run import QuickstartConfig, write_data

    cfg = QuickstartConfig()
    paths = write_data(tmp_path, cfg)
    records = [json.loads(line) for line in paths["qa"].read_text().splitlines()]
    dialogues = [r for r in records if r.get("independent_turns") is False]
    images = len({q.image_id for q in load_easy_vqa("train").questions})
    assert abs(len(dialogues) - cfg.dialogue_fraction * images) <= 0.01 * images
    same = [r for r in dialogues if len(r["image"]) == 1]
    switch = [r for r in dialogues if len(r["image"]) == 2]
    assert len(same) + len(switch) == len(dialogues) and abs(len(same) - 0.4 * len(dialogues)) <= 1
    assert all(len(r["conversations"]) == 2 * SAME_IMAGE_TURNS for r in same)
    for r in switch:
        assert r["image"][0] != r["image"][1] and len(r["conversations"]) == 2 * sum(SWITCH_TURNS)
        humans = [t["value"] for t in r["conversations"][::2]]
        assert [h.startswith("<image>\n") for h in humans] == [True, False, True, False]
    parsed = record_from_dict(switch[0])
    assert parsed.independent_turns is False and len(parsed.images) == 2
    blind = [json.loads(line) for line in paths["qa_blind"].read_text().splitlines()]
    blank = str(tmp_path / "blank.png")
    assert all(r["image"] == [blank] * len(r["image"]) if isinstance(r["image"], list) else r["image"] == blank for r in blind)


def test_held_out_conversations_score_follow_ups_and_the_first_question_after_a_switch():
    from eve_vlm.quickstart.conversations import held_out_conversations
    from eve_vlm.quickstart.easy_vqa_data import load_easy_vqa

    test = load_easy_vqa("test")
    convs = held_out_conversations(test, 30, seed=0)
    assert convs == held_out_conversations(test, 30, seed=0)
    follow = [c for c in convs if c.kind == "follow_up"]
    switch = [c for c in convs if c.kind == "image_switch"]
    assert len(follow) == len(switch) == 30
    for c in follow:
        assert c.scored == [False, True, True] and c.new_image[1:] == [None, None]
        assert len({q.image_id for q in c.questions}) == 1
    for c in switch:
        assert c.scored == [False, True] and c.new_image[0] != c.new_image[1]
        assert c.questions[0].image_id != c.questions[1].image_id


def test_data_written_under_a_relative_folder_names_readable_images(tmp_path, monkeypatch):
    """`eve quickstart` writes under runs/quickstart (relative); a reader resolves relative image
    paths against the manifest's folder, so every record must name its images absolutely."""
    from pathlib import Path

    from eve_vlm.quickstart.run import QuickstartConfig, write_data

    monkeypatch.chdir(tmp_path)
    paths = write_data(Path("runs/qs/data"), QuickstartConfig())
    for key in ("captions", "qa", "qa_blind"):
        for line in paths[key].read_text().splitlines()[:200]:
            images = json.loads(line)["image"]
            for image in images if isinstance(images, list) else [images]:
                assert Path(image).is_absolute() and Path(image).is_file(), (key, image)


def test_dialogue_questions_train_every_question_type_at_every_turn():
    """Distinct questions of the image, in an order that puts each type at each turn: a chat asks
    yes/no questions in later turns too."""
    import random

    from eve_vlm.quickstart.conversations import dialogue_questions
    from eve_vlm.quickstart.easy_vqa_data import EasyVQAQuestion

    qs = [EasyVQAQuestion(f"q{i}", a, 0, t) for i, (a, t) in enumerate(
        [("yes", "yes_no"), ("no", "yes_no"), ("red", "color"), ("circle", "shape"), ("no", "yes_no")])]
    seen = set()
    for seed in range(40):
        picked = dialogue_questions(qs, 3, random.Random(seed))
        assert len(picked) == 3 and len({q.text for q in picked}) == 3 and all(q in qs for q in picked)
        seen |= {(turn, q.question_type) for turn, q in enumerate(picked)}
    assert seen == {(turn, kind) for turn in range(3) for kind in ("yes_no", "color", "shape")}
    assert len(dialogue_questions(qs[:2], 3, random.Random(0))) == 2
