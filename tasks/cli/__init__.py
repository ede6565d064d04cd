"""The ``seqpe-nd`` command line: one entry point, one sub-command module per job.

Each sub-command module exposes ``register(subparsers)``; importing them lazily keeps
``seqpe-nd --help`` fast.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence

# (command, module that registers it)
COMMANDS: tuple[tuple[str, str], ...] = (
    ("space", "seqpe_nd.tasks.cli.space"),
    ("train", "seqpe_nd.tasks.cli.train"),
    ("eval", "seqpe_nd.tasks.cli.evaluate"),
    ("compare", "seqpe_nd.tasks.cli.compare"),
    ("plot", "seqpe_nd.tasks.cli.plot"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqpe-nd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _, module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        print(f"seqpe-nd {args.command}: error: {err}", file=sys.stderr)
        return 2

