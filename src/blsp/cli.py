"""The ``blsp`` command. Each subsystem registers its own sub-commands in ``blsp.<pkg>.cli``.

A registering module imports only ``argparse`` and light helpers at import time; heavy work
(torch, transformers) is imported inside the command's handler so ``blsp --help`` stays fast.
A command group may name a default sub-command (:func:`set_default_subcommand`): ``blsp eval -s ..``
is ``blsp eval run -s ..``, ``blsp behave MANIFEST OUT`` is ``blsp behave run MANIFEST OUT``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from blsp import __version__
from blsp.errors import BlspError

COMMAND_MODULES = (
    "blsp.models.cli",
    "blsp.data.cli",
    "blsp.behaviors.cli",
    "blsp.training.cli",
    "blsp.inference.cli",
    "blsp.serving.cli",
    "blsp.evaluation.cli",
    "blsp.demo.cli",
)


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose sub-commands may have a default, used when none is named."""

    default_subcommand: str | None = None

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self.default_subcommand is not None:
            args = list(sys.argv[1:] if args is None else args)
            names = {n for a in self._actions if isinstance(a, argparse._SubParsersAction) for n in a.choices}
            if not args or (args[0] not in names and args[0] not in ("-h", "--help")):
                args.insert(0, self.default_subcommand)
        return super().parse_known_args(args, namespace)


def set_default_subcommand(parser: argparse.ArgumentParser, name: str) -> None:
    """Make ``name`` the sub-command of ``parser`` that runs when the command line names none."""
    if not hasattr(parser, "default_subcommand"):
        raise TypeError("set_default_subcommand needs a parser made by blsp.cli.build_parser")
    parser.default_subcommand = name


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="blsp",
        description="BLSP: teach an instruction-following LLM to understand speech by behavior alignment.",
    )
    parser.add_argument("--version", action="version", version=f"blsp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except BlspError as e:
        print(f"blsp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
