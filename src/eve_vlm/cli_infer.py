"""`eve chat`, `eve ask` and `eve serve`: inference from the command line.

Answers go to stdout, everything else (logs, errors) to stderr, so `eve ask` composes in scripts.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="checkpoint folder (weights, config, tokenizer, preprocessor)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `chat`, `ask` and `serve` commands."""
    chat = subparsers.add_parser("chat", help="multi-turn chat in the terminal (/image FILE, /reset, /quit)")
    _model_args(chat)
    chat.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    chat.add_argument("--system", default=None, help="system prompt (default: the template's)")
    _sampling_args(chat, 512)
    chat.set_defaults(func=run_chat)

    ask = subparsers.add_parser("ask", help="answer one question about an image; prints only the answer")
    _model_args(ask)
    ask.add_argument("--image", action="append", default=[], help="image file (repeatable; none = text only)")
    ask.add_argument("question", help="the question")
    _sampling_args(ask, 256)
    ask.set_defaults(func=run_ask)

    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with a web demo at /")
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", default=None, help="model id reported by /v1/models (default: folder name)")
    serve.add_argument("--max-batch-size", type=int, default=8)
    serve.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long to gather concurrent requests"
    )
    serve.add_argument(
        "--allow-remote-images", action="store_true", help="let the server fetch http(s) image URLs"
    )
    serve.add_argument(
        "--allow-file-images",
        action="store_true",
        help="let clients name files on the server with file: URLs",
    )
    serve.add_argument("--max-images", type=int, default=4, help="images per request")
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    serve.add_argument("--max-prompt-tokens", type=int, default=8192, help="prompt tokens, images included")
    serve.add_argument("--max-output-tokens", type=int, default=1024)
    serve.add_argument("--max-body-mb", type=float, default=20.0)
    serve.set_defaults(func=run_serve)


def _generation_config(args: argparse.Namespace):
    from .generate.sampling import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )


def run_ask(args: argparse.Namespace) -> int:
    """One question, answer on stdout; exit code 2 for bad input."""
    from .generate.answer import answer
    from .processing.images import ImageError
    from .serve.cli import load_for_inference

    _setup_logging()
    try:
        cfg = _generation_config(args)
        model, processor = load_for_inference(args.model, args.device, args.dtype)
        question = "<image>\n" * len(args.image) + args.question
        text = answer(model, processor, [question], [list(args.image)], config=cfg)[0]
    except (ImageError, FileNotFoundError, ValueError) as exc:
        print(f"eve ask: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """Interactive chat; answers stream to stdout."""
    from .generate.chat import HELP, ChatSession, run_repl
    from .processing.images import ImageError
    from .serve.cli import load_for_inference

    _setup_logging()
    try:
        cfg = _generation_config(args)
        model, processor = load_for_inference(args.model, args.device, args.dtype)
        session = ChatSession(model, processor, cfg, system=args.system)
        for image in args.image:
            session.add_image(image)
    except (ImageError, FileNotFoundError, ValueError) as exc:
        print(f"eve chat: {exc}", file=sys.stderr)
        return 2
    print(HELP, file=sys.stderr)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run_repl(session, input, write)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from .serve.app import ServerSettings
    from .serve.cli import serve
    from .serve.inputs import ServerLimits

    _setup_logging()
    limits = ServerLimits(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        default_max_tokens=min(256, args.max_output_tokens),
        allow_remote_images=args.allow_remote_images,
        allow_file_images=args.allow_file_images,
    )
    settings = ServerSettings(
        model_name=args.name or "eve",
        limits=limits,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
    )
    try:
        serve(
            args.model,
            host=args.host,
            port=args.port,
            settings=settings,
            device=args.device,
            dtype=args.dtype,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"eve serve: {exc}", file=sys.stderr)
        return 2
    return 0
