"""The ``blsp`` command. Each subsystem registers its own sub-commands in ``blsp.<pkg>.cli``.

A registering module imports only ``argparse`` and light helpers at import time; heavy work
(torch, transformers) is imported inside the command's handler so ``blsp --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

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
    "blsp.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
