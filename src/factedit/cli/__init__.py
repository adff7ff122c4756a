"""The ``factedit`` command line. Parses, calls the library, prints; no algorithms here.

Each module in :data:`COMMAND_MODULES` defines ``register(subparsers)``, which adds its
subcommand(s) with ``func`` set. The list is explicit and every module is imported: a module
that fails to import is an error, never a silently missing command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from .. import __version__

#: One module per command group.
COMMAND_MODULES: tuple[str, ...] = (
    "inspect",  # generate, info
    "edit",  # edit, stats
    "methods",  # methods
    "demo",  # demo, chat, apply
    "trace",  # trace
    "eval",  # eval
    "train",  # train (learned editors)
    "serve",  # serve (the web page)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="factedit",
        description="Locate and edit factual knowledge in transformer language models.",
        epilog="Run 'factedit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"factedit {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details and show tracebacks"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f".{name}", __name__)
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        with warnings.catch_warnings():
            # Library warnings (e.g. a subject placed after the relation) read as CLI messages.
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, LookupError, OSError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"factedit: error: {exc}", file=sys.stderr)
        return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if category.__module__.startswith("factedit") or "factedit" in str(filename):
        text = f"factedit: warning: {message}\n"
    else:  # other libraries' warnings keep their usual form
        text = warnings.formatwarning(message, category, filename, lineno, line)
    sys.stderr.write(text)
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
