"""The ``pyro-livi`` command.

Each subcommand lives in its own module under :mod:`pyro_livi.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the function that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

from .errors import InputError, TrainingDivergedError

#: Subcommand modules, in the order ``pyro-livi --help`` lists them.
COMMAND_MODULES = (
    "simulate",
    "models",
    "fit",
    "associate",
    "demo",
    "evaluate",
    "compare",
    "preprocess",
    "perturb",
    "causal",
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit code 2) that names the
    help to read, instead of the full usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _check_device(parser: argparse.ArgumentParser, args) -> None:
    """``--device cuda`` on a machine without CUDA: a one-line usage error (exit code 2)."""
    device = getattr(args, "device", None)
    if not isinstance(device, str) or device == "cpu":
        return
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, f"pyro-livi {args.command}: error: argument --device: {device!r} "
                    "requested but CUDA is not available here (torch.cuda.is_available() is "
                    "False); use --device cpu\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``pyro-livi`` parser. Subcommands whose flags depend on other flags of the command
    line (``fit``: the chosen model's options) take ``argv`` in their ``register``."""
    parser = _Parser(
        prog="pyro-livi",
        description="A Pyro model zoo for population-scale single-cell data: LIVI and its multimodal "
        "extensions, baselines; fit, test donor factors against genotypes, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"pyro_livi.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"pyro_livi.commands.{name}":
                continue  # not part of this installation
            raise
        if "argv" in inspect.signature(module.register).parameters:
            module.register(sub, argv=sys.argv[1:] if argv is None else argv)
        else:
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _check_device(parser, args)
    try:
        return int(args.func(args) or 0)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except TrainingDivergedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
