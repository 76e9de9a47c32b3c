"""`eve profile`: FLOPs, parameters and latency of the vision part and the LLM part of a model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from ..cli_args import non_negative_int
from ..runtime import DTYPE_CHOICES, resolve_device, resolve_dtype


def _image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"image size must look like WIDTHxHEIGHT (e.g. 672x672), got {text!r}"
        ) from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return w, h


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="FLOPs, parameters and latency of the vision part and the LLM part",
        description=(
            "Analytic FLOPs (matmuls only) and meta-device parameter counts for one image and a text "
            "prompt, plus the EVE paper's efficiency-table rows next to ours. See docs/profile.md."
        ),
    )
    p.add_argument(
        "--config",
        required=True,
        help="built-in name (eve-7b-v1, eve-7b-hd-v1, eve-7b-hd-v2, llava-1.5-7b) or a checkpoint folder / config.json",
    )
    p.add_argument(
        "--image-size", type=_image_size, default=None, help="input image WxH (default: square, native size)"
    )
    p.add_argument(
        "--prompt-tokens", type=non_negative_int, default=0, help="text tokens besides the image"
    )
    p.add_argument(
        "--convention",
        choices=["standard", "paper"],
        default="standard",
        help="standard: 2 FLOPs/MAC, dense attention, lm_head on all positions; paper: the EVE table's convention",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--latency", action="store_true", help="time a real forward of a random model (small configs only)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="--latency device: cpu, cuda, cuda:1, ...; auto: CUDA if available, else cpu",
    )
    p.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="--latency dtype; auto: bfloat16 on CUDA, float32 on CPU"
    )
    p.add_argument(
        "--latency-max-params",
        type=float,
        default=1.5e9,
        help="largest model (parameters) --latency builds",
    )
    p.add_argument("--no-paper", action="store_true", help="leave out the paper's table")
    p.set_defaults(func=run)


def _fmt_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _fmt_params(x: float) -> str:
    if x >= 1e9:
        return f"{x / 1e9:.3f} B"
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x / 1e3:.1f} K"


def print_report(data: dict[str, Any], out: TextIO | None = None) -> None:
    """Human-readable tables for the dict `run` builds (to stdout by default)."""
    out = out or sys.stdout
    w, h = data["image_size"]
    pw, ph = data["pixel_size"]
    gh, gw = data["grid"]
    conv = data["convention"]
    out.write(f"{data['name']}: {data['description']}\n")
    out.write(
        f"image {w}x{h} -> pixels {pw}x{ph}, grid {gh} rows x {gw} cols, {data['visual_tokens']} visual tokens; "
        f"prompt {data['prompt_tokens']} tokens\n"
    )
    out.write(
        f"convention '{conv['name']}': vision {conv['vision_flops_per_mac']} / LLM {conv['llm_flops_per_mac']} FLOPs per MAC, "
        f"attention {conv['attention']}, lm_head {conv['lm_head']}, LLM visual tokens {conv['llm_visual_tokens']}\n\n"
    )
    out.write(f"{'part':<8}{'params':>14}{'FLOPs':>14}\n")
    out.write(
        f"{'vision':<8}{_fmt_params(data['vision_params']):>14}{_fmt_flops(data['vision_flops']):>14}\n"
    )
    out.write(f"{'LLM':<8}{_fmt_params(data['llm_params']):>14}{_fmt_flops(data['llm_flops']):>14}\n")
    for part in ("vision_flops", "llm_flops"):
        items = ", ".join(f"{k} {_fmt_flops(v)}" for k, v in data["breakdown"][part].items())
        out.write(f"  {part.split('_')[0]}: {items}\n")
    if data["llm_text_path_params"] != data["llm_params"]:
        out.write(
            f"  LLM weights a text token uses: {_fmt_params(data['llm_text_path_params'])} "
            "(the rest are the vision copies)\n"
        )
    if data.get("official_blend_llm_flops"):
        out.write(
            f"  official blend-both-branches LLM forward: {_fmt_flops(data['official_blend_llm_flops'])} "
            "(we route each token through one branch)\n"
        )
    out.write(f"  decoding one more text token: {_fmt_flops(data['decode_flops_per_token'])}\n")
    lat = data.get("latency")
    if lat:
        if "skipped" in lat:
            out.write(f"\nlatency: skipped ({lat['skipped']})\n")
        else:
            out.write(
                f"\nlatency on {lat['device']} ({lat['dtype']}, {lat['threads']} threads, random weights): "
                f"vision {lat['vision_ms']:.1f} ms, prefill of {lat['prefill_tokens']} tokens {lat['prefill_ms']:.1f} ms "
                f"(LLM part {lat['llm_ms']:.1f} ms)\n"
            )
    rows = data.get("paper_table")
    if rows:
        out.write(
            "\nEVE paper efficiency table vs ours (convention 'paper': square image at native size, "
            "no prompt; see docs/profile.md)\n"
        )
        out.write(f"{'row':<11}{'column':<8}{'image':>11}{'paper':>12}{'ours':>12}{'diff':>9}\n")
        for r in rows:
            size = "x".join(str(v) for v in r["image_size"])
            out.write(
                f"{r['row']:<11}{r['column']:<8}{size:>11}{_fmt_flops(r['paper_flops']):>12}"
                f"{_fmt_flops(r['our_flops']):>12}{r['relative_diff'] * 100:>+8.1f}%\n"
            )


def run(args: argparse.Namespace) -> int:
    from .profile import CONVENTIONS, load_target, measure_latency, paper_comparison, profile

    if args.latency:  # a device this machine lacks fails now, not after the FLOP count
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    target = load_target(args.config)  # a bad name or folder: ValueError / FileNotFoundError, one line
    prof = profile(target, args.image_size, args.prompt_tokens, CONVENTIONS[args.convention])
    if args.latency:
        prof.latency = measure_latency(
            target,
            args.image_size,
            args.prompt_tokens,
            max_params=args.latency_max_params,
            device=device,
            dtype=dtype,
        )
    data = prof.to_dict()
    if not args.no_paper:
        data["paper_table"] = paper_comparison()
    if args.json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        print_report(data)
    return 0
