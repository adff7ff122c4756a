"""The modules that contribute ``factedit`` subcommands beyond ``generate`` and ``info``.

Each module named here defines ``register(subparsers, add_model_args)``, which adds its
subparser(s) with ``func`` set. A module that is missing is skipped, so the CLI works while
capabilities are added one by one.
"""

from __future__ import annotations

COMMAND_MODULES: tuple[str, ...] = (
    "factedit.cli_edit",  # edit, stats
    "factedit.cli_demo",  # demo, chat, apply
    "factedit.cli_trace",  # trace
    "factedit.cli_eval",  # eval
)
