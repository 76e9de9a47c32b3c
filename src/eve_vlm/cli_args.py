"""Argument pieces every `eve` subcommand shares: the help formatter, --model/--device/--dtype, number checks.

Kept apart from `eve_vlm.cli` so subcommand modules can use them without importing the entry point.
"""

from __future__ import annotations

import argparse

from .runtime import DTYPE_CHOICES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where it says nothing (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if "%(default)" in help_text or default is argparse.SUPPRESS:
            return help_text
        if default is None or default is False or default == [] or default == ():
            return help_text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `HelpFormatter` by default, so every (sub)command's help shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_model_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--model, --device and --dtype, with the one meaning of "auto" (see eve_vlm.runtime)."""
    p.add_argument(
        "--model", required=required, help="checkpoint folder (weights, config, tokenizer, preprocessor)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:1, ...; auto: CUDA if available (the LOCAL_RANK GPU under torchrun), else cpu",
    )
    p.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="weights dtype; auto: bfloat16 on CUDA, float32 on CPU"
    )


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0: any free port)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value
