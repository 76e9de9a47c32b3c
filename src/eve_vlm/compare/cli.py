"""`eve compare`: encoder-free EVE v1 / v2 vs an encoder-based baseline at equal training compute."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from .config import MODELS

    p = sub.add_parser(
        "compare",
        help="encoder-free EVE v1 / v2 vs an encoder-based model on easy-VQA at equal training FLOPs and time",
        description="Train EVE v1, EVEv2 and an encoder-based baseline (frozen EfficientNet-Lite0 + MLP "
        "projector) from SmolLM2 on easy-VQA, each to the same training-FLOPs budget and the same "
        "wall-clock budget, evaluating held-out accuracy along the way; writes compare.json, "
        "report.md and plots.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, the new layers and training")
    p.add_argument("--full", action="store_true",
                   help="1/4, 1/2 and all of the training images (~45 min on 2 CPU cores; default: 1/4, ~14 min)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to compare")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .config import CompareConfig
    from .study import run_study

    cfg = CompareConfig(out=args.out, seed=args.seed, full=args.full, models=tuple(args.models))
    command = "eve " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "eve compare"
    summary = run_study(cfg, command=command)
    for r in sorted(summary["runs"], key=lambda r: (r["data_fraction"], r["budget"], r["model"])):
        per = r["per_type"]
        print(f"data {r['data_fraction']:<4g} {r['budget']:5s} {r['model']:8s} {100 * r['accuracy']:5.1f}%  "
              f"(colour {100 * per.get('color', 0):.0f}%, shape {100 * per.get('shape', 0):.0f}%, "
              f"yes/no {100 * per.get('yes_no', 0):.0f}%)  {r['train_flops']:.3g} FLOPs, {r['train_seconds']:.0f} s")
    print(f"\nReport: {args.out / 'report.md'}")
    return 0
