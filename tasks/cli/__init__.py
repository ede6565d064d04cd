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
    ("export", "seqpe_nd.tasks.cli.export"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqpe-nd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _, module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def package_version() -> str:
    """The installed distribution's version (``pyproject.toml``'s, once installed, editable or not)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("seqpe-nd")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user's mistake (bad YAML, field, value or file, an incompatible run) is one
    paragraph on stderr and exit status 2; a bug in this code still shows its traceback."""
    from pydantic import ValidationError

    from seqpe_nd.positions.errors import format_validation_error

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "more_flags", False):  # only a command that parses more flags takes them
        parser.parse_args(argv)  # argparse's own one-line error and exit status 2
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except ValidationError as err:  # a model validated outside a config loader: still one line per field
        print(f"seqpe-nd {args.command}: error: {format_validation_error(err)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # user errors: one paragraph, no traceback
        print(f"seqpe-nd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seqpe-nd {args.command}: interrupted (checkpoints already written are complete)", file=sys.stderr)
        return 130

