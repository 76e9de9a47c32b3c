"""`eve eval`: run a benchmark with a checkpoint, or re-score a finished run without a model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from eve_vlm.cli_args import add_model_args, positive_int
from eve_vlm.eval.benchmarks import BENCHMARKS
from eve_vlm.eval.runner import format_table, model_answerer, rescore, run_eval

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `eval` command."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on a benchmark (resumable), or re-score a run",
        description="Run a benchmark (see docs/evaluation.md for data layouts) or --rescore an output folder.",
    )
    add_model_args(p, required=False)
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), help="benchmark name")
    p.add_argument("--data", help="benchmark data folder (or its question file)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N questions (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="questions per generate call")
    p.add_argument(
        "--out", default=None, help="output folder (default: eval_runs/<benchmark>); reruns resume"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="generation budget per answer")
    p.add_argument(
        "--rescore", metavar="DIR", default=None, help="re-score the predictions in DIR; no model needed"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute `eve eval`; prints the results table, returns the exit code."""
    try:
        return _rescore(args) if args.rescore else _evaluate(args)
    except KeyError as exc:  # a field the benchmark data or the run file should have
        raise ValueError(f"missing field {exc.args[0]!r} in the benchmark data or run file") from exc


def _rescore(args: argparse.Namespace) -> int:
    print(format_table(rescore(args.rescore, data_dir=args.data)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from eve_vlm.loading import check_checkpoint_folder, load_for_inference
    from eve_vlm.runtime import resolve_device, resolve_dtype

    flags = (("--model", args.model), ("--benchmark", args.benchmark), ("--data", args.data))
    missing = [flag for flag, value in flags if not value]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or use --rescore DIR)")
    check_checkpoint_folder(args.model)
    if not Path(args.data).exists():
        raise FileNotFoundError(f"benchmark data not found: {args.data}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, processor = load_for_inference(args.model, device, dtype)
    out = Path(args.out) if args.out else Path("eval_runs") / args.benchmark
    results = run_eval(
        args.benchmark,
        args.data,
        model_answerer(model, processor, args.max_new_tokens),
        out_dir=out,
        limit=args.limit,
        batch_size=args.batch_size,
    )
    print(format_table(results))
    print(f"predictions and results in {out}")
    return 0
