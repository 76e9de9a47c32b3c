"""Run a benchmark with any answerer, resumably, and score it.

Predictions are appended (and flushed) to `out_dir/predictions.jsonl` batch by batch, so an
interrupted run resumes where it stopped and a finished run can be re-scored without the model
(`rescore`). The model is only reached through an `Answerer`, which keeps this module free of
torch and lets tests use a fake.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from eve_vlm.eval.benchmarks import Benchmark, EvalItem, get_benchmark

logger = logging.getLogger(__name__)

Answerer = Callable[[list[EvalItem]], list[str]]
"""Answers a batch of items, one string per item, in order."""

PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.json"
RUN_FILE = "run.json"


def model_answerer(model: Any, processor: Any, max_new_tokens: int = 128) -> Answerer:
    """Adapt `eve_vlm.generate.answer` (greedy, batched) to the `Answerer` protocol."""
    from eve_vlm.generate import answer  # imported here: the runner itself never needs torch

    def _answer(items: list[EvalItem]) -> list[str]:
        prompts = [it.user_message for it in items]
        images = [it.load_images() for it in items]
        return answer(model, processor, prompts, images, max_new_tokens=max_new_tokens)

    return _answer


def load_predictions(path: Path) -> dict[str, str]:
    """Predictions by question-id string; a torn last line (killed mid-write) is ignored."""
    preds: dict[str, str] = {}
    if not path.exists():
        return preds
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                logger.warning("ignoring a truncated last line in %s", path)
                continue
            raise ValueError(f"{path}:{i + 1}: invalid JSON line") from None
        preds[str(rec["question_id"])] = rec["prediction"]
    return preds


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write) so appended records stay one per line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        logger.warning("dropping a truncated last line of %s", path)
        with open(path, "r+b") as f:
            f.truncate(keep)


def _batched(items: Iterable[EvalItem], n: int) -> Iterator[list[EvalItem]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _select_items(
    benchmark_name: str, data_dir: str | Path, limit: int | None
) -> tuple[Benchmark, list[EvalItem]]:
    bench = get_benchmark(benchmark_name, data_dir)
    items = list(itertools.islice(bench.items(), limit))
    seen: set[str] = set()
    for it in items:
        if it.key in seen:
            raise ValueError(f"{benchmark_name}: duplicate question id {it.question_id!r}")
        seen.add(it.key)
    return bench, items


def _check_run_file(out_dir: Path, run_info: dict[str, Any]) -> None:
    path = out_dir / RUN_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("benchmark") != run_info["benchmark"]:
            raise ValueError(
                f"{out_dir} holds predictions for benchmark {old.get('benchmark')!r}, not {run_info['benchmark']!r}"
            )
    path.write_text(json.dumps(run_info, indent=2), encoding="utf-8")


def run_eval(
    benchmark_name: str,
    data_dir: str | Path,
    answerer: Answerer,
    *,
    out_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Answer every not-yet-answered question of a benchmark, then score it.

    Returns (and writes to `out_dir/results.json`) the results dict of `score_predictions`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bench, items = _select_items(benchmark_name, data_dir, limit)
    _check_run_file(out, {"benchmark": bench.name, "data_dir": str(Path(data_dir).resolve()), "limit": limit})

    pred_path = out / PREDICTIONS_FILE
    _drop_torn_tail(pred_path)
    done = load_predictions(pred_path)
    todo = [it for it in items if it.key not in done]
    logger.info(
        "%s: %d questions, %d already answered, %d to go",
        bench.name,
        len(items),
        len(items) - len(todo),
        len(todo),
    )
    start = time.perf_counter()
    n_batches = math.ceil(len(todo) / batch_size)
    with open(pred_path, "a", encoding="utf-8") as f:
        for b, batch in enumerate(_batched(todo, batch_size), 1):
            answers = answerer(batch)
            if len(answers) != len(batch):
                raise RuntimeError(f"answerer returned {len(answers)} answers for a batch of {len(batch)}")
            for it, ans in zip(batch, answers, strict=True):
                rec = {"question_id": it.question_id, "prompt": it.prompt_text, "prediction": ans}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            if b % 10 == 0 or b == n_batches:
                logger.info("%s: batch %d/%d (%.1f s)", bench.name, b, n_batches, time.perf_counter() - start)
    return _score_and_save(bench, items, load_predictions(pred_path), out)


def rescore(out_dir: str | Path, *, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Score the saved predictions of a (possibly unfinished) run again, without a model."""
    out = Path(out_dir)
    run_path = out / RUN_FILE
    if not run_path.exists():
        raise FileNotFoundError(f"{run_path} not found: {out} is not an eval output folder")
    info = json.loads(run_path.read_text(encoding="utf-8"))
    bench, items = _select_items(info["benchmark"], data_dir or info["data_dir"], info.get("limit"))
    return _score_and_save(bench, items, load_predictions(out / PREDICTIONS_FILE), out)


def score_predictions(
    bench: Benchmark, items: list[EvalItem], predictions: Mapping[str, str], out_dir: Path
) -> dict[str, Any]:
    """Metrics over the answered items plus the submission files; missing answers are counted."""
    answered = [it for it in items if it.key in predictions]
    metrics = bench.score(answered, predictions) if answered else {}
    files = bench.write_submission(items, predictions, out_dir)
    headline = bench.headline if bench.headline in metrics else None
    return {
        "benchmark": bench.name,
        "num_items": len(items),
        "num_answered": len(answered),
        "num_missing": len(items) - len(answered),
        "headline": {"metric": headline, "value": metrics[headline]} if headline else None,
        "metrics": metrics,
        "submission_files": [str(p) for p in files],
    }


def _score_and_save(
    bench: Benchmark, items: list[EvalItem], predictions: Mapping[str, str], out: Path
) -> dict[str, Any]:
    results = score_predictions(bench, items, predictions, out)
    if results["num_missing"]:
        logger.warning(
            "%s: %d of %d questions have no prediction", bench.name, results["num_missing"], len(items)
        )
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    return results


def format_table(results: Mapping[str, Any]) -> str:
    """A plain two-column text table of a results dict (the CLI prints it)."""
    rows: list[tuple[str, str]] = [
        ("benchmark", str(results["benchmark"])),
        ("answered", f"{results['num_answered']}/{results['num_items']}"),
    ]
    if results.get("headline"):
        rows.append((f"* {results['headline']['metric']}", f"{results['headline']['value']:.2f}"))
    for k, v in results["metrics"].items():
        rows.append((k, f"{v:.2f}" if isinstance(v, float) else str(v)))
    rows += [("submission", p) for p in results.get("submission_files", [])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
