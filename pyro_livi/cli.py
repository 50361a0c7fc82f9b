"""The ``pyro-livi`` command.

Each subcommand lives in its own module under :mod:`pyro_livi.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the function that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import InputError

#: Subcommand modules, in the order ``pyro-livi --help`` lists them.
COMMAND_MODULES = (
    "simulate",
    "fit",
    "associate",
    "demo",
    "evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-livi",
        description="LIVI and its multimodal extensions in Pyro: fit, test donor factors "
        "against genotypes, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"pyro_livi.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"pyro_livi.commands.{name}":
                continue  # not part of this installation
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
