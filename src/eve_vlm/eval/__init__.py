"""Benchmark evaluation: readers, official metrics, a resumable runner and an lmms-eval adapter."""

from eve_vlm.eval.benchmarks import BENCHMARKS, Benchmark, EvalItem, get_benchmark
from eve_vlm.eval.runner import Answerer, format_table, model_answerer, rescore, run_eval

__all__ = [
    "BENCHMARKS",
    "Answerer",
    "Benchmark",
    "EvalItem",
    "format_table",
    "get_benchmark",
    "model_answerer",
    "rescore",
    "run_eval",
]
