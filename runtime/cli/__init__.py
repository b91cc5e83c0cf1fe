"""The `brim` command: `brim generate | serve | plan | facts | operator`.

Each subcommand lives in its own module of this package exposing `register(subparsers)`,
which adds its parser and sets `func(args) -> int` (the exit code). Only the chosen
subcommand's module is imported, and modules import torch only inside the commands that
run the engine, so `brim plan` (and the operator) work where torch is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module -> what it adds; imported lazily so `brim plan` never imports torch.
SUBCOMMANDS = {
    "generate": "brim.runtime.cli.generate",
    "serve": "brim.runtime.cli.serve",
    "plan": "brim.runtime.cli.plan",
    "facts": "brim.runtime.cli.facts",
    "operator": "brim.runtime.cli.operator",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brim", description="Serve LLMs sized to fit the GPU: engine, server, planner."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen subcommand's module is imported (others may need torch).
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, module in SUBCOMMANDS.items():
        if chosen is None or name == chosen:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=f"see `brim {name} --help`")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
