"""`eve export` (a remote-code folder) and `eve merge-lora` (an adapter merged into its base)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model folder that plain transformers loads (trust_remote_code)")
    p.add_argument("model", help="checkpoint folder (ours or a released EVE one)")
    p.add_argument("out", help="output folder")
    p.add_argument("--remote-code", action="store_true", required=True,
                   help="include the modelling files and an auto_map (the one export format)")
    p.set_defaults(func=run_export)
    m = sub.add_parser("merge-lora", help="merge a LoRA adapter into its base checkpoint")
    m.add_argument("base", help="the base checkpoint folder the adapter was trained on")
    m.add_argument("adapter", help="folder with adapter_config.json + adapter_model.safetensors")
    m.add_argument("out", help="output folder for the merged model (with the base's processor)")
    m.set_defaults(func=run_merge)


def run_export(args: argparse.Namespace) -> int:
    from ..loading import check_checkpoint_folder
    from .remote_code import export_remote_code

    check_checkpoint_folder(args.model)
    export_remote_code(args.model, args.out)
    print(args.out)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from ..loading import check_checkpoint_folder
    from ..train.lora import merge_lora

    check_checkpoint_folder(args.base)
    merge_lora(args.base, args.adapter, args.out)
    print(args.out)
    return 0
