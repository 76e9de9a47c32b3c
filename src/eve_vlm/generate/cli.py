"""`eve ask` and `eve chat`: answers from the command line.

Answers go to stdout, everything else (logs, errors) to stderr, so `eve ask` composes in scripts.
Inputs (model folder, device, images, sampling flags) are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cli_args import add_model_args, non_negative_int, positive_float


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=non_negative_int, default=max_new_tokens, help="answer length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k likeliest tokens (0 = off)")
    p.add_argument(
        "--repetition-penalty", type=positive_float, default=1.0, help="CTRL-style penalty on seen tokens (1 = off)"
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: not seeded)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `chat` and `ask` commands."""
    chat = subparsers.add_parser(
        "chat",
        help="multi-turn chat in the terminal (/image FILE, /reset, /quit)",
        description="Chat with a checkpoint; answers stream to stdout. In the chat, /image FILE "
        "attaches an image to your next message, /reset starts over, /quit leaves.",
    )
    add_model_args(chat)
    chat.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    chat.add_argument("--system", default=None, help="system prompt (default: the template's)")
    _sampling_args(chat, 512)
    chat.set_defaults(func=run_chat)

    ask = subparsers.add_parser(
        "ask",
        help="answer one question about an image; prints only the answer",
        description="Answer one question (about zero or more images) and print only the answer on stdout.",
    )
    add_model_args(ask)
    ask.add_argument("--image", action="append", default=[], help="image file (repeatable; none = text only)")
    ask.add_argument("question", help="the question; <image> marks where an image goes (default: before the text)")
    _sampling_args(ask, 256)
    ask.set_defaults(func=run_ask)


def generation_config(args: argparse.Namespace):
    """The GenerationConfig the sampling flags describe (raises ValueError for a bad combination)."""
    from .sampling import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _prepare(args: argparse.Namespace) -> tuple[Any, Any, list[Any], Any]:
    """Every cheap check first, then the model: (model, processor, decoded images, config)."""
    from ..loading import check_checkpoint_folder, load_for_inference
    from ..processing.images import load_image
    from ..runtime import resolve_device, resolve_dtype

    check_checkpoint_folder(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = generation_config(args)
    images = [load_image(path) for path in args.image]  # ImageError: missing, corrupt, too large
    model, processor = load_for_inference(args.model, device, dtype)
    return model, processor, images, cfg


def run_ask(args: argparse.Namespace) -> int:
    """One question, the answer on stdout."""
    from .answer import answer
    from .prompts import with_image_placeholders

    # the placeholder rule of `answer()`, applied here too so that a mismatch fails before loading
    question = with_image_placeholders(args.question, len(args.image))
    model, processor, images, cfg = _prepare(args)
    text = answer(model, processor, [question], [images], config=cfg)[0]
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """Interactive chat; answers stream to stdout, the help line to stderr."""
    from .chat import HELP, ChatSession, run_repl

    model, processor, images, cfg = _prepare(args)
    session = ChatSession(model, processor, cfg, system=args.system)
    for image in images:
        session.add_image(image)
    print(HELP, file=sys.stderr)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run_repl(session, input, write)
    return 0
