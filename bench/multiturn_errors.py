"""Where the quickstart model's multi-turn answers go wrong, and stage 3 retrained with another
dialogue order.

Why: a chat's later turns are where a VQA model trained on single questions fails. This scores
the report's held-out conversations answer by answer (as `evaluate_conversations` does, the
model's own answers as history) and splits the accuracy by turn and question type, by whether an
earlier answer already gives the answer away, and by whether an earlier answer was wrong.

    python bench/multiturn_errors.py runs/quickstart/final       # about a minute on two cores

`--retrain OUT_DIR` first trains stage 3 alone from a finished quickstart's `2_pretrain/final`
with the run's seed (with the default `--order random`, the shipped one, this reproduces the run's
own stage 3 exactly), or with the dialogue questions in another order: `leak-free` (one yes/no
question first, then colour and shape, so that no answer follows from earlier ones) or
`random-unrevealed` (random, skipping any question whose answer the earlier ones give away); it
prints the single-question accuracy too. About 7 minutes on a quiet two-core machine:

    python bench/multiturn_errors.py runs/quickstart --retrain /tmp/mt --order leak-free
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict
from pathlib import Path

import torch

from eve_vlm.generate import GenerationConfig, generate, resolve_config, with_image_placeholders
from eve_vlm.loading import load_for_inference
from eve_vlm.quickstart import conversations
from eve_vlm.quickstart.easy_vqa_data import COLORS, SHAPES, EasyVQAQuestion, load_easy_vqa, normalize_answer

WORDS = re.compile(r"[a-z]+")


def subject(q: EasyVQAQuestion) -> tuple[str, str, bool]:
    """(attribute, value, whether the answer gives the attribute's value away)."""
    if q.question_type != "yes_no":
        return q.question_type, q.answer, True
    words = set(WORDS.findall(q.text))
    colour = sorted(words & set(COLORS))
    attribute, value = ("color", colour[0]) if colour else ("shape", sorted(words & set(SHAPES))[0])
    return attribute, value, (q.answer == "yes") != bool(words & {"not", "no"})


def leak_free(questions: list[EasyVQAQuestion], n: int, rng: random.Random) -> list[EasyVQAQuestion]:
    """Up to `n` questions with no answer given away by earlier ones: one yes/no question first, then
    colour and shape, further yes/no questions only when those run out."""
    yes_no = [q for q in questions if q.question_type == "yes_no"]
    what = [q for q in questions if q.question_type != "yes_no"]
    rng.shuffle(yes_no)
    rng.shuffle(what)
    return (yes_no[:1] + what + yes_no[1:])[:n]


def random_unrevealed(questions: list[EasyVQAQuestion], n: int, rng: random.Random) -> list[EasyVQAQuestion]:
    """Up to `n` questions in random order, skipping any whose answer earlier answers give away (best
    of 8 orders: one that reveals both attributes early leaves nothing to ask)."""
    best: list[EasyVQAQuestion] = []
    for _ in range(8):
        revealed, asked, picked = set(), set(), []
        for q in rng.sample(questions, len(questions)):
            attribute, value, reveals = subject(q)
            if attribute in revealed or (attribute, value) in asked:
                continue
            picked.append(q)
            asked.add((attribute, value))
            revealed |= {attribute} if reveals else set()
            if len(picked) == n:
                break
        best = max(best, picked, key=len)
        if len(best) == n:
            break
    return best


def retrain_stage3(run: Path, out: Path, order: str) -> Path:
    from eve_vlm.model.eve import EveForCausalLM
    from eve_vlm.processing.processor import EveProcessor
    from eve_vlm.quickstart.run import QuickstartConfig, evaluate, stage_recipe, write_data
    from eve_vlm.train import Trainer

    if order != "random":  # dialogue_records looks it up at call time
        conversations.dialogue_questions = random_unrevealed if order == "random-unrevealed" else leak_free
    cfg = QuickstartConfig(out=out, fit_budget=False)
    torch.manual_seed(cfg.seed)
    data = write_data(out / "data", cfg)
    model = EveForCausalLM.from_pretrained(run / "2_pretrain" / "final")
    processor = EveProcessor.from_pretrained(run / "2_pretrain" / "final")
    model.detach_aligning_layer()
    recipe = stage_recipe("3_sft", cfg, [f"output_dir={out / '3_sft'}", f"data.path={data['qa']}"])
    Trainer.from_recipe(recipe, model=model, processor=processor).train()
    single = evaluate(model, processor, cfg)
    print(f"single questions: overall {single['accuracy']:.3f}, "
          + ", ".join(f"{k} {v:.3f}" for k, v in single["per_type"].items()))
    return out / "3_sft" / "final"


def answers(model_dir: Path, count: int, seed: int) -> list[dict]:
    from PIL import Image

    model, processor = load_for_inference(model_dir, "cpu", torch.float32)
    convs = conversations.held_out_conversations(load_easy_vqa("test"), count, seed)
    cfg = resolve_config(model, GenerationConfig(max_new_tokens=4), tokenizer=processor.tokenizer,
                         stop_strings=getattr(processor, "stop_strings", None))
    history: list[list[dict]] = [[] for _ in convs]
    images: list[list] = [[] for _ in convs]
    rows: list[dict] = []
    for turn in range(max(len(c.questions) for c in convs)):
        active = [i for i, c in enumerate(convs) if turn < len(c.questions)]
        for start in range(0, len(active), 32):
            chunk = active[start : start + 32]
            prompts = []
            for i in chunk:
                c, text = convs[i], convs[i].questions[turn].text
                if c.new_image[turn] is not None:
                    images[i].append(Image.open(c.new_image[turn]).convert("RGB"))
                    text = with_image_placeholders(text, 1)
                history[i].append({"role": "user", "content": text})
                prompts.append(processor.apply_chat_template(history[i], add_generation_prompt=True))
            batch = processor(prompts, images=[im for i in chunk for im in images[i]], padding_side="left")
            out = generate(model, batch["input_ids"], batch.get("images"), batch["attention_mask"], config=cfg,
                           tokenizer=processor.tokenizer)
            for i, seq in zip(chunk, out.sequences, strict=True):
                reply = processor.tokenizer.decode(seq, skip_special_tokens=True).strip()
                history[i].append({"role": "assistant", "content": reply})
                rows.append({"conv": i, "turn": turn, "kind": convs[i].kind, "question": convs[i].questions[turn],
                             "ok": normalize_answer(reply) == normalize_answer(convs[i].questions[turn].answer),
                             "scored": convs[i].scored[turn], "new_image": convs[i].new_image[turn] is not None})
    return rows


def breakdown(rows: list[dict]) -> dict[str, list[int]]:
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    state: dict[int, tuple[set, set, bool]] = {}
    for r in sorted(rows, key=lambda r: (r["conv"], r["turn"])):
        if r["new_image"]:
            state[r["conv"]] = (set(), set(), state.get(r["conv"], (None, None, True))[2])
        revealed, asked, all_ok = state[r["conv"]]
        attribute, value, reveals = subject(r["question"])
        given_away = attribute in revealed or (attribute, value) in asked
        keys = [f"{r['kind']} turn {r['turn'] + 1}: {r['question'].question_type}"]
        if r["scored"]:
            keys += ["scored: all", f"scored: {r['kind']}",
                     "scored: answer given away by earlier answers" if given_away else "scored: answer still open",
                     "scored: after a wrong answer" if not all_ok else "scored: after right answers only"]
        for key in keys:
            hits[key][0] += r["ok"]
            hits[key][1] += 1
        asked.add((attribute, value))
        revealed |= {attribute} if reveals else set()
        state[r["conv"]] = (revealed, asked, all_ok and r["ok"])
    return dict(hits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a model folder, or with --retrain a finished quickstart's --out")
    p.add_argument("--retrain", type=Path, default=None, help="train stage 3 alone into this folder first")
    p.add_argument("--order", choices=["random", "leak-free", "random-unrevealed"], default="random")
    p.add_argument("--conversations", type=int, default=200, help="held-out conversations of each kind")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model_dir = retrain_stage3(args.model, args.retrain, args.order) if args.retrain else args.model
    hits = breakdown(answers(model_dir, args.conversations, args.seed))
    print(f"{'answers':60s} accuracy")
    for key in sorted(hits):
        ok, n = hits[key]
        print(f"{key:60s} {ok / n:6.1%} ({ok}/{n})")
    if args.retrain:
        (args.retrain / "multiturn_breakdown.json").write_text(json.dumps(hits, indent=1))


if __name__ == "__main__":
    main()
