"""The `eve` command: one entry point, one subcommand module per job.

Manners as in git and pip: logging is configured here once; a command that fails on bad input
(a missing path, a bad recipe field, a device this machine lacks, a corrupt image, ...) prints one
line, `eve: error: ...`, on stderr and exits with 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import traceback
from importlib import metadata

from .cli_args import ArgumentParser

# Each module exposes `register(subparsers)`; its parsers set `func` to a `run(args) -> int`.
SUBCOMMAND_MODULES = (
    "eve_vlm.conversion.cli",
    "eve_vlm.train.cli",
    "eve_vlm.data.cli",
    "eve_vlm.generate.cli",
    "eve_vlm.serve.cli",
    "eve_vlm.eval.cli",
    "eve_vlm.eval.profile_cli",
    "eve_vlm.export.cli",
    "eve_vlm.quickstart.cli",
    "eve_vlm.compare.cli",
)
# Subcommand modules whose package needs an optional dependency, with the commands they add:
# without it those commands still show in the help and fail in one line saying what to install.
OPTIONAL_MODULES = {"eve_vlm.serve.cli": ("serve",)}
DISTRIBUTION = "eve-vlm"
USAGE_ERROR = 2  # the exit code of bad input, as argparse uses for bad flags
INTERRUPTED = 130
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def version() -> str:
    """The installed distribution's version (the package's own when run from an uninstalled checkout)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="eve", description="Encoder-free vision-language models (EVE v1 / v2).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if name not in OPTIONAL_MODULES or (exc.name or "").startswith("eve_vlm"):
                raise
            _register_missing_extra(sub, name, exc)
            continue
        module.register(sub)
    return parser


class MissingExtraError(ImportError):
    """A command whose optional dependencies are not installed."""


def extra_providing(module: str | None) -> str | None:
    """The pip extra of eve-vlm that installs the top-level `module` (from the package metadata)."""
    if not module:
        return None
    top = module.split(".")[0].lower()
    if top == "eve_vlm":  # the library itself: a bug or a broken install, not a missing extra
        return None
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        extra = _EXTRA_MARKER.search(requirement)
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)
        if extra and name and name.group(0).lower().replace("-", "_") == top:
            return extra.group(1)
    return None


def missing_extra_error(command: str, exc: ModuleNotFoundError) -> MissingExtraError | None:
    """The one-line error for `command` failing on an optional dependency, None for any other import error."""
    extra = extra_providing(exc.name)
    if extra is None:
        return None
    return MissingExtraError(
        f"`eve {command}` needs the optional dependency {exc.name!r}: pip install 'eve-vlm[{extra}]'"
    )


def _register_missing_extra(sub: argparse._SubParsersAction, module: str, exc: ModuleNotFoundError) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise missing_extra_error(args.command, exc) or MissingExtraError(
            f"`eve {args.command}` needs {exc.name!r}, which is not installed"
        )

    for command in OPTIONAL_MODULES[module]:
        # No option prefix, so every argument (--flags too) lands in `rest` and the command can say
        # what to install instead of complaining about flags it cannot know.
        p = sub.add_parser(command, help=f"(not installed: needs {exc.name})", add_help=False, prefix_chars="\0")
        p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
        p.set_defaults(func=fail)


def configure_logging(verbose: bool) -> None:
    """The one logging set-up of the tool: to stderr, so stdout carries only results."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input rather than a bug: reported in one line, exit code 2.

    The library's own errors (RecipeError, CheckpointError, ConfigError, ImageError, DeviceError,
    ...) are ValueErrors; missing or unreadable paths are OSErrors; YAML syntax errors, a data set
    with too many broken records and a command whose pip extra is not installed are the user's too.
    """
    types: list[type[BaseException]] = [OSError, ValueError, MissingExtraError]
    yaml = sys.modules.get("yaml")
    if yaml is not None:
        types.append(yaml.YAMLError)
    dataset = sys.modules.get("eve_vlm.data.dataset")
    if dataset is not None:
        types.append(dataset.TooManyBrokenRecords)
    return tuple(types)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages are joined)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and not isinstance(exc, MissingExtraError):
            exc = missing_extra_error(args.command, exc) or exc
        if not isinstance(exc, user_error_types()):
            raise
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.write(f"eve: error: {one_line(exc)}\n")
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
