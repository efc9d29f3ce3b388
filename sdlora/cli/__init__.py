"""The `sdlora` command: one module per group of subcommands, each with `register(subparsers)`; every subcommand
parses its flags and calls library functions."""

from __future__ import annotations

import argparse
import logging
import re
import sys


class Parser(argparse.ArgumentParser):
    """argparse with its mistakes in one line (what to fix, and where the help is) instead of a usage block; a value
    like '-1,0,1' (`generate --scales`) is a value, not an unknown option (as Python 3.12's argparse reads it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d[\d.,+-]*$")

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import compare, fit, slider, tools, train, ui, world

    parser = Parser(prog="sdlora", description="Train and use Stable Diffusion LoRAs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show library logs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in (train, slider, fit, tools, compare, world, ui):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return 130
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("\ninterrupted (a run stopped this way resumes from its last checkpoint with --resume)",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the boundary: one line, and a bug's traceback in a log it names
        from ..failures import describe

        message, bug = describe(e, verbose=args.verbose)
        print(f"error: {message}", file=sys.stderr)
        return 3 if bug else 2


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("diffusers", "transformers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
