"""`eve eval`: run a benchmark with a checkpoint, or re-score a finished run without a model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from eve_vlm.eval.benchmarks import BENCHMARKS
from eve_vlm.eval.runner import format_table, model_answerer, rescore, run_eval

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `eval` command."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on a benchmark (resumable), or re-score a run",
        description="Run a benchmark (see docs/evaluation.md for data layouts) or --rescore an output folder.",
    )
    p.add_argument("--model", help="checkpoint folder (model + processor)")
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), help="benchmark name")
    p.add_argument("--data", help="benchmark data folder (or its question file)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    p.add_argument(
        "--out", default=None, help="output folder (default: eval_runs/<benchmark>); reruns resume"
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation budget per answer")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights dtype (auto: as saved)")
    p.add_argument(
        "--rescore", metavar="DIR", default=None, help="re-score the predictions in DIR; no model needed"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute `eve eval`; prints the results table, returns the exit code."""
    if args.rescore:
        try:
            results = rescore(args.rescore, data_dir=args.data)
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"eve eval: error: {e}")
            return 1
        print(format_table(results))
        return 0

    missing = [
        flag
        for flag, value in (("--model", args.model), ("--benchmark", args.benchmark), ("--data", args.data))
        if not value
    ]
    if missing:
        print(f"eve eval: error: {', '.join(missing)} required (or use --rescore DIR)")
        return 2

    import torch

    from eve_vlm import EveForCausalLM, EveProcessor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = EveForCausalLM.from_pretrained(args.model, dtype=dtype, device=device).eval()
    processor = EveProcessor.from_pretrained(args.model)
    out = Path(args.out) if args.out else Path("eval_runs") / args.benchmark
    try:
        results = run_eval(
            args.benchmark,
            args.data,
            model_answerer(model, processor, args.max_new_tokens),
            out_dir=out,
            limit=args.limit,
            batch_size=args.batch_size,
        )
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"eve eval: error: {e}")
        return 1
    print(format_table(results))
    print(f"predictions and results in {out}")
    return 0
