"""Tokens/s of Hugging Face `model.generate` against our own generation (`eve_vlm.generate`).

One random mid-size EVEv2 model, the same prompts and images (batch 1 and batch 4, images of
different sizes), greedy, exactly `--new-tokens` new tokens per row (both paths are kept from
stopping early: no EOS). Each figure is the best of `--repeats` runs, prefill included; both paths run
interleaved in one process, so the ratio is measured under the same load. It also checks that
the two paths give the same tokens.

    python bench/hf_generate.py [--threads 1] [--hidden 512] [--layers 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from eve_vlm import EveForCausalLM
from eve_vlm.generate import GenerationConfig, build_prompts, generate
from eve_vlm.processing import EveProcessor
from eve_vlm.testing import make_tiny_checkpoint

QUESTIONS = ["Describe the image in detail.", "What colour is the shape?", "Is it a circle?", "What is it?"]
SIZES = [(224, 224), (160, 96), (96, 160), (128, 128)]
COLORS = ["red", "blue", "green", "yellow"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs per path and batch size; the best counts")
    return p.parse_args()


def build(folder: Path, hidden: int, layers: int) -> tuple[EveForCausalLM, EveProcessor]:
    heads = max(hidden // 64, 1)
    make_tiny_checkpoint(
        folder,
        "v2",
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1),
        vision_hidden_size=256,
    )
    return EveForCausalLM.from_pretrained(folder).eval(), EveProcessor.from_pretrained(folder)


def inputs(processor: EveProcessor, batch: int) -> dict:
    prompts = build_prompts(processor, [f"<image>\n{q}" for q in QUESTIONS[:batch]])
    images = [Image.new("RGB", s, c) for s, c in zip(SIZES[:batch], COLORS[:batch], strict=True)]
    return processor(text=prompts, images=images, padding_side="left")


def run_ours(model: EveForCausalLM, enc: dict, n: int, pad: int) -> list[list[int]]:
    cfg = GenerationConfig(max_new_tokens=n, eos_token_id=[-1], pad_token_id=pad)  # never stops early
    return generate(model, enc["input_ids"], enc["images"], enc["attention_mask"], config=cfg).sequences


def run_hf(model: EveForCausalLM, enc: dict, n: int, pad: int) -> list[list[int]]:
    # The model's generation_config has no EOS here (set in main): no stop, no EOS suppression.
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=pad)
    return out[:, enc["input_ids"].shape[1] :].tolist()


def agreement(ours: list[list[int]], hf: list[list[int]]) -> str:
    """Whether every row is identical ("yes"), else how many leading tokens each row shares."""
    shared = []
    for a, b in zip(ours, hf, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        shared.append(k)
    n = len(ours[0])
    return "yes" if all(k == n for k in shared) else "first " + ", ".join(map(str, shared)) + f" of {n}"


def best_time(fn, repeats: int) -> tuple[float, list[list[int]]]:
    best, result = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build(Path(tmp) / "model", args.hidden, args.layers)
    pad = processor.pad_token_id
    model.generation_config.eos_token_id = None  # both paths make exactly --new-tokens tokens
    n = args.new_tokens
    params = model.num_parameters() / 1e6
    print(
        f"random EVEv2, {params:.1f}M parameters, fp32, CPU, {args.threads} thread(s), {n} new tokens per row"
    )
    print("| batch | HF generate tok/s | ours tok/s | ours / HF | identical greedy tokens per row |")
    print("|---:|---:|---:|---:|---|")
    for batch in (1, 4):
        enc = inputs(processor, batch)
        run_ours(model, enc, 2, pad), run_hf(model, enc, 2, pad)  # warm-up
        t_hf, hf = best_time(lambda enc=enc: run_hf(model, enc, n, pad), args.repeats)
        t_ours, ours = best_time(lambda enc=enc: run_ours(model, enc, n, pad), args.repeats)
        tokens = batch * n
        same = agreement([list(r) for r in ours], hf)
        print(
            f"| {batch} | {tokens / t_hf:.1f} | {tokens / t_ours:.1f} | {t_hf / t_ours:.2f} | {same} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
