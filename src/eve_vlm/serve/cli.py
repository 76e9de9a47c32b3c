"""`eve serve`: an OpenAI-compatible HTTP server with a web demo at /."""

from __future__ import annotations

import argparse

from ..cli_args import add_model_args, non_negative_float, port_number, positive_float, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` command."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with a web demo at /",
        description="Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/chat/completions) "
        "with continuous batching of concurrent requests, Prometheus metrics at /metrics, and a web demo at /.",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on")
    p.add_argument(
        "--served-model-name",
        "--name",
        dest="name",
        default=None,
        help="model id in /v1/models, which requests must name (default: the model's name; a generic "
        "folder such as final/ or checkpoint-N takes its parent's name)",
    )
    p.add_argument(
        "--scheduler",
        choices=("continuous", "dynamic"),
        default="continuous",
        help="continuous: rows join and leave at every decoding step; dynamic: batches run to the end",
    )
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=positive_int, default=256, help="waiting requests; more get 503")
    p.add_argument(
        "--batch-wait-ms",
        type=non_negative_float,
        default=5.0,
        help="dynamic: how long to gather concurrent requests into a batch",
    )
    p.add_argument(
        "--kv-capacity",
        type=positive_int,
        default=2048,
        help="continuous: KV-cache tokens per row (prompt + answer)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=positive_int,
        default=512,
        help="continuous: longer prompts prefill in chunks of this many tokens",
    )
    p.add_argument(
        "--request-timeout", type=positive_float, default=600.0, help="seconds a request may take in all"
    )
    p.add_argument(
        "--allow-remote-images", action="store_true", help="let the server fetch http(s) image URLs"
    )
    p.add_argument(
        "--allow-file-images",
        action="store_true",
        help="let clients name files on the server with file: URLs",
    )
    p.add_argument("--max-images", type=positive_int, default=4, help="images per request")
    p.add_argument("--max-image-pixels", type=positive_int, default=4096 * 4096, help="pixels per image")
    p.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        default=8192,
        help="prompt tokens per request, images included",
    )
    p.add_argument(
        "--max-output-tokens", type=positive_int, default=1024, help="largest max_tokens a client may ask"
    )
    p.add_argument("--max-body-mb", type=positive_float, default=20.0, help="largest request body, in MiB")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the inputs and the port, then load the model and serve until interrupted."""
    from ..loading import check_checkpoint_folder
    from ..runtime import resolve_device, resolve_dtype
    from .app import ServerSettings
    from .inputs import ServerLimits
    from .server import check_port_free, serve

    check_checkpoint_folder(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_port_free(args.host, args.port)
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
        max_queue=args.max_queue,
        scheduler=args.scheduler,
        kv_capacity=args.kv_capacity,
        prefill_chunk=args.prefill_chunk,
        request_timeout_s=args.request_timeout,
    )
    serve(args.model, host=args.host, port=args.port, settings=settings, device=device, dtype=dtype)
    return 0
