"""`eve quickstart`: the whole EVE recipe at small scale on a CPU, with a report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from ..model.config import PATCH_ACTIVATIONS

    p = sub.add_parser(
        "quickstart",
        help="turn SmolLM2 into an encoder-free VLM on easy-VQA and report accuracy",
        description="The whole EVE recipe at small scale: convert SmolLM2 into an EVE model, train its "
        "three stages on easy-VQA within a time budget, and report held-out accuracy.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder (models, report)")
    p.add_argument("--variant", choices=["v1", "v2"], default="v1", help="EVE architecture to train")
    p.add_argument(
        "--budget-minutes", type=float, default=15.0,
        help="scales the training steps (15 -> the recipe steps on a CPU; on a GPU 720 / 1200 / 1344 steps for stages 1 / 2 / 3)",
    )
    p.add_argument(
        "--fixed-steps", action="store_true",
        help="run the recipe steps even where this machine is too slow for them to fit the budget "
        "(default: shorten stages 3 and 2 to fit)",
    )
    p.add_argument("--eval-questions", type=int, default=1000, help="held-out questions to score (0 = all 9673)")
    p.add_argument("--layers", default="0-1,28-29", help="SmolLM2 layers kept, of 0-29 (first and last keep the head aligned)")
    p.add_argument("--no-blind", action="store_true", help="skip the blind (blank-image) baseline")
    p.add_argument(
        "--blind-steps", type=int, default=100,
        help="stage-3 steps of the blind baseline at the 15-minute budget (it reaches the answer prior in ~60)",
    )
    p.add_argument("--no-teacher", action="store_true", help="ablation: no aligning-layer teacher loss")
    p.add_argument("--skip-stage", action="append", default=[], choices=["1_prealign", "2_pretrain"],
                   help="ablation: skip this stage (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the new layers and training")
    p.add_argument(
        "--questions-per-sample", type=int, default=None,
        help="at most this many questions about one image per stage-3 sample",
    )
    p.add_argument(
        "--stage3-turns", choices=["independent", "dialogue"], default="independent",
        help="a sample's questions as independent single-turn samples sharing the image prefix "
        "or as one dialogue (later turns can read earlier answers)",
    )
    p.add_argument(
        "--dialogue-fraction", type=float, default=0.3,
        help="fraction of training images that also get a multi-turn dialogue in stage 3 "
        "(follow-up questions, or a switch to a second image), so that chat works",
    )
    p.add_argument(
        "--multiturn-conversations", type=int, default=200,
        help="held-out conversations of each kind scored for the multi-turn accuracy (0 = skip)",
    )
    p.add_argument(
        "--caption-style", choices=["short", "varied"], default="short",
        help='stages 1-2 captions: "a <colour> <shape>" or eight varied phrasings',
    )
    p.add_argument(
        "--patch-activation", choices=PATCH_ACTIVATIONS, default="gelu",
        help="v1: GELU after the patch conv (ours) or none (the official linear conv)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
        help="recipe override for every stage, or one stage (e.g. 3_sft:optim.lr=1e-3); repeatable",
    )
    p.add_argument(
        "--stage3-lora", action="store_true",
        help="stage 3 as a LoRA fine-tune of the stage-2 model (adapters merged into OUT/final) instead of full fine-tuning",
    )
    p.add_argument(
        "--ablations", action="store_true", help="run (a) full, (b) no stage 1, (c) no teacher at equal compute; compare"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .run import STAGES, run_quickstart, stage_recipe

    # bad flags fail here (a RecipeError is a ValueError: one line, exit 2), before minutes of set-up
    cfg = _config(args)
    for stage in STAGES:
        stage_recipe(stage, cfg, [])
    if args.ablations:
        return _run_ablations(cfg)
    m = run_quickstart(cfg)
    pct = lambda x: "-" if x is None else f"{100 * x:5.1f}%"  # noqa: E731
    per, bper = m["per_type"], m["blind_per_type"] or {}
    print(f"\nEVE quickstart ({m['wall_seconds'] / 60:.1f} min; stage 3: {m['stage3']}): accuracy on {m['eval_questions']} held-out questions")
    print(f"  {'':22s} overall  colour   shape   yes/no")
    print(f"  {'EVE (ours)':22s} {pct(m['accuracy'])} {pct(per.get('color'))} {pct(per.get('shape'))} {pct(per.get('yes_no'))}")
    if m["blind_accuracy"] is not None:
        print(f"  {'blind (blank images)':22s} {pct(m['blind_accuracy'])} {pct(bper.get('color'))} {pct(bper.get('shape'))} {pct(bper.get('yes_no'))}")
    pp = m["prior_per_type"]
    print(f"  {'answer prior':22s} {pct(m['prior_accuracy'])} {pct(pp.get('color'))} {pct(pp.get('shape'))} {pct(pp.get('yes_no'))}")
    if m["multiturn_accuracy"] is not None:
        kinds = m["multiturn"]["by_kind"]
        print(f"  multi-turn: {pct(m['multiturn_accuracy'])} (follow-ups {pct(kinds.get('follow_up'))}, "
              f"after an image switch {pct(kinds.get('image_switch'))})")
    print(f"\nReport: {args.out / 'report.md'}")
    print(f"Chat with the model: eve chat --model {args.out / 'final'} --image path/to/image.png")
    return 0


def _config(args: argparse.Namespace):
    from ..conversion import parse_layers
    from .run import QuickstartConfig

    return QuickstartConfig(
        out=args.out,
        variant=args.variant,
        budget_minutes=args.budget_minutes,
        fit_budget=not args.fixed_steps,
        keep_layers=parse_layers(args.layers),
        eval_questions=args.eval_questions,
        blind=not args.no_blind,
        blind_steps=args.blind_steps,
        seed=args.seed,
        skip_stages=tuple(args.skip_stage),
        no_teacher=args.no_teacher,
        overrides=tuple(args.overrides),
        short_captions=args.caption_style == "short",
        patch_activation=args.patch_activation,
        stage3_turns=args.stage3_turns,
        dialogue_fraction=args.dialogue_fraction,
        multiturn_conversations=args.multiturn_conversations,
        stage3_lora=args.stage3_lora,
        **({"questions_per_sample": args.questions_per_sample} if args.questions_per_sample is not None else {}),
    )


def _run_ablations(cfg) -> int:
    from .ablations import run_ablations

    run_ablations(cfg)
    print((cfg.out / "ablations.md").read_text())
    print(f"Plot of the stage-2 losses: {cfg.out / 'ablations.png'}")
    return 0
