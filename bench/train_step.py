"""Training-step throughput on this CPU, as a fraction of its measured fp32 matmul peak, and the
padding waste of padded vs packed batches of mixed-aspect-ratio images.

    PYTHONPATH=src python bench/train_step.py [--hidden 512 --layers 8 --max-size 704 --batch 4]

What is measured, in one run:

1. peak: the best FLOP/s of a large fp32 ``torch.matmul`` (2 n^3 FLOPs for n x n x n), with the
   same thread count as the training step;
2. a real ``Trainer.train_step`` (data loading + image preprocessing, forward, backward, clipping,
   AdamW) of an EVEv2 model (Qwen2-style decoder with modality-specific vision copies, every group
   trainable as in stage 2) on captioned images whose spliced rows are ~512 tokens;
3. achieved fraction = model FLOPs per step / step time / peak. Convention: 6 FLOPs per parameter
   a token passes through (2 forward + 4 backward; every weight trains, so weight gradients count):
   a token passes through ONE decoder branch (the text weights or their vision copies, the same
   size), visual tokens also through the vision tower (counted once per token; its first conv runs
   on 4 patches per token, so it is undercounted), and only supervised tokens through lm_head
   (the loss projects only those). Attention scores (QK^T, AV) are not parameters and are left out;
   the figure "incl. attention" adds 6 * layers * T * hidden per token (causal, T = row length).
4. padding waste (``eve_vlm.data.padding_waste``): images of different sizes and aspect ratios
   through the real processor (training resize: shrink only, so sizes differ), one sample per
   row padded to the longest (arrival order, and length-grouped) vs packed rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from eve_vlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from eve_vlm.data import DataConfig, EveDataset, ReaderConfig, open_records, pack_examples, padding_waste
from eve_vlm.model import EveConfig, EveForCausalLM
from eve_vlm.processing import EveImageConfig, EveImageProcessor, EveProcessor
from eve_vlm.testing import draw_shape, generate_shapes_dataset, make_tiny_tokenizer
from eve_vlm.train import Recipe, Trainer


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best observed fp32 FLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def build(args: argparse.Namespace) -> tuple[EveForCausalLM, EveProcessor]:
    tokenizer = make_tiny_tokenizer(corpus="shapes")
    cfg = EveConfig(
        version="v2", family="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
        vision_hidden_size=args.hidden, patch_stride=16, merge_stride=2, modality_experts=True,
        attention_bias=True, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = EveForCausalLM(cfg)
    image_cfg = EveImageConfig(version="v2", max_size=args.max_size, patch_stride=16, dense_stride=2)
    return model, EveProcessor(EveImageProcessor(image_cfg), tokenizer, template="chatml")


def param_counts(model: EveForCausalLM) -> dict[str, int]:
    counts = {"branch": 0, "vision": 0, "lm_head": 0, "other": 0}
    for name, p in model.named_parameters():
        if name.startswith("model.layers.") and ".moe_" not in name:
            counts["branch"] += p.numel()  # the text branch; the vision copies are the same size
        elif name.startswith("model.vision_tower."):
            counts["vision"] += p.numel()
        elif name == "lm_head.weight":
            counts["lm_head"] += p.numel()
        elif ".moe_" not in name:
            counts["other"] += p.numel()  # embeddings (a lookup), final norm
    return counts


def bench_step(args: argparse.Namespace, work: Path, peak: float) -> dict[str, float]:
    model, processor = build(args)
    generate_shapes_dataset(work / "data", args.batch * (args.steps + 1), "caption")
    recipe = Recipe.from_dict({
        "name": "bench", "output_dir": str(work / "run"), "device": "cpu", "precision": "fp32",
        "model": {"version": "v2"}, "trainable": ["vision", "experts", "llm"],
        "data": {"path": str(work / "data/caption.jsonl"), "image_root": str(work / "data"),
                 "max_length": 4096, "template": "plain", "shuffle": False},
        "optim": {"lr": 1e-4, "warmup_ratio": 0.0},
        "global_batch_size": args.batch, "micro_batch_size": args.batch, "max_steps": args.steps + 1,
    })
    trainer = Trainer.from_recipe(recipe, model=model, processor=processor, progress=False)
    counts = param_counts(model)

    flops = seconds = tokens = 0.0
    row_lengths: list[int] = []
    orig_next = trainer.batches.next

    def spy() -> dict:
        """Count the step's tokens from the batch the trainer is about to use."""
        batch = orig_next()
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        is_img = (ids == IMAGE_TOKEN_INDEX) & mask
        per_image = torch.tensor([processor.num_image_tokens(im) for im in batch["images"]] or [0])
        row_of_image = is_img.nonzero()[:, 0]  # images are in row-major placeholder order
        visual_per_row = torch.zeros(ids.shape[0], dtype=torch.long).index_add_(0, row_of_image, per_image[: len(row_of_image)])
        rows = (mask & ~is_img).sum(1) + visual_per_row  # spliced length of each row
        row_lengths.extend(rows.tolist())
        supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        spy.last = (int(rows.sum()), int(visual_per_row.sum()), supervised)  # type: ignore[attr-defined]
        return batch

    trainer.batches.next = spy  # type: ignore[method-assign]
    trainer.train_step()  # warm-up (allocator, first-call overheads)
    row_lengths.clear()
    for _ in range(args.steps):
        rec = trainer.train_step()
        real, visual, supervised = spy.last  # type: ignore[attr-defined]
        seconds += rec["seconds"]
        tokens += real
        flops += 6 * (counts["branch"] * real + counts["vision"] * visual + counts["lm_head"] * supervised)
    T = sum(row_lengths) / len(row_lengths)
    attn = 6 * args.layers * T * args.hidden * tokens
    return {
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_per_token_branch": counts["branch"], "params_vision": counts["vision"],
        "params_lm_head": counts["lm_head"], "mean_row_tokens": T,
        "tokens_per_s": tokens / seconds, "seconds_per_step": seconds / args.steps,
        "model_flops_per_s": flops / seconds, "fraction_of_peak": flops / seconds / peak,
        "fraction_of_peak_incl_attention": (flops + attn) / seconds / peak,
    }


MIXED_SIZES = [(640, 480), (320, 640), (800, 200), (224, 224), (1024, 768), (150, 300), (500, 500), (96, 96),
               (1280, 360), (400, 300), (300, 900), (128, 256), (704, 704), (256, 192), (60, 600), (900, 900)]


def bench_padding(args: argparse.Namespace, work: Path) -> dict[str, float]:
    _, processor = build(args)
    folder = work / "mixed"
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, (w, h) in enumerate(MIXED_SIZES):
        img: Image.Image = draw_shape("red", "circle", seed=i).resize((w, h))
        img.save(folder / f"images/{i}.png")
        conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red circle."}]
        lines.append(json.dumps({"id": str(i), "image": f"images/{i}.png", "conversations": conv}))
    (folder / "r.jsonl").write_text("\n".join(lines) + "\n")
    source = open_records(str(folder / "r.jsonl"), ReaderConfig(shuffle=False))
    examples = list(EveDataset(source, processor, DataConfig(max_length=4096, training_resize=True)))
    lengths = [ex.spliced_length for ex in examples]
    b = args.batch
    batches = [lengths[i:i + b] for i in range(0, len(lengths), b)]
    grouped = sorted(lengths, reverse=True)
    grouped_batches = [grouped[i:i + b] for i in range(0, len(grouped), b)]
    budget = max(args.pack_length, max(lengths))
    rows = [sum(ex.spliced_length for ex in row) for row in pack_examples(examples, budget)]
    row_batches = [rows[i:i + b] for i in range(0, len(rows), b)]

    def waste(groups: list[list[int]]) -> float:  # slot-weighted over the batches
        slots = sum(max(g) * len(g) for g in groups)
        return sum(padding_waste(g) * max(g) * len(g) for g in groups) / slots

    return {
        "samples": len(examples), "spliced_lengths": lengths, "pack_budget": budget,
        "padded": waste(batches), "padded_length_grouped": waste(grouped_batches),
        "packed": waste(row_batches), "packed_rows": len(rows),
        "packed_vs_budget": padding_waste(rows, budget),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-size", type=int, default=704, help="v2 max_size: a square image -> 507 visual tokens")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--matmul", type=int, default=2048, help="side of the peak-measuring matmul")
    p.add_argument("--pack-length", type=int, default=1024, help="row budget of the packed batches")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    peak = matmul_peak(args.matmul)
    with tempfile.TemporaryDirectory() as tmp:
        step = bench_step(args, Path(tmp), peak)
        pad = bench_padding(args, Path(tmp))

    print(f"threads: {torch.get_num_threads()}   fp32 matmul peak ({args.matmul}^3): {peak / 1e9:.1f} GFLOP/s")
    print(f"model: EVEv2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
          f"{step['params_total'] / 1e6:.1f}M params ({step['params_per_token_branch'] / 1e6:.1f}M per decoder "
          f"branch, {step['params_vision'] / 1e6:.2f}M vision tower, {step['params_lm_head'] / 1e6:.1f}M lm_head)")
    print(f"train step: batch {args.batch} x ~{step['mean_row_tokens']:.0f} tokens, "
          f"{step['seconds_per_step']:.2f} s/step, {step['tokens_per_s']:.0f} tokens/s")
    print(f"model FLOP/s (6 x params a token passes through): {step['model_flops_per_s'] / 1e9:.1f} GFLOP/s = "
          f"{step['fraction_of_peak']:.1%} of peak ({step['fraction_of_peak_incl_attention']:.1%} incl. attention)")
    print(f"padding waste, {pad['samples']} mixed-aspect images (spliced lengths {pad['spliced_lengths']}), "
          f"batches of {args.batch}:")
    print(f"  padded, arrival order : {pad['padded']:.1%}")
    print(f"  padded, length-grouped: {pad['padded_length_grouped']:.1%}")
    print(f"  packed ({pad['packed_rows']} rows, budget {pad['pack_budget']}): {pad['packed']:.1%} "
          f"(vs the full row budget: {pad['packed_vs_budget']:.1%})")


if __name__ == "__main__":
    main()
