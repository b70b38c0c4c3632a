"""The ``tbt`` command line: one console script with subcommands.

Every module in this package except this one is a subcommand provider: it defines
``register(subparsers)`` which adds one (or a few) sub-parsers and sets ``func`` on them.
Imports of heavy libraries (transformers, datasets, ...) happen inside the handlers, so
``tbt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys


class CliError(Exception):
    """A user-facing error: printed as ``tbt: error: <message>`` without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbt",
        description=(
            "Ternary (-1, 0, +1) and binary (+-1) text generators: distil a full-precision "
            "model into a TBT student, evaluate it, pack it and run it fast."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "register"):
            mod.register(sub)
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
        rc = args.func(args)
    except (CliError, ValueError, OSError) as e:  # OSError: missing, unreadable, read-only ...
        print(f"tbt {_command(args)}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def _command(args: argparse.Namespace) -> str:
    sub = getattr(args, "tokenizer_command", None)  # two-word commands: tbt tokenizer train
    return f"{args.command} {sub}" if sub else args.command


def _one_line(e: BaseException) -> str:
    """The message on one line (library and OS messages may span several)."""
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename is not None and not text:
        text = f"{e.strerror}: {e.filename}"
    return text or type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
