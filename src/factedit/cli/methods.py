"""``factedit methods``: list the editing methods and show their default hyperparameters."""

from __future__ import annotations

import argparse
import json

from .common import add_model_args, load


def register(sub) -> None:
    p = sub.add_parser(
        "methods",
        help="list the editing methods; --show-hparams METHOD prints its defaults for a model",
        description=(
            "Without options: the available methods with a one-line description. With "
            "--show-hparams METHOD: that method's default hyperparameters for --model (the "
            "shipped per-model file, or the generic defaults adapted to the model), as JSON "
            "that --hparams accepts."
        ),
    )
    p.add_argument(
        "--show-hparams", metavar="METHOD", default=None, help="print METHOD's defaults as JSON"
    )
    add_model_args(p)
    p.set_defaults(func=cmd_methods)


def cmd_methods(args: argparse.Namespace) -> int:
    from ..methods import available_methods, get_method, resolve_hparams

    if args.show_hparams is None:
        for name in available_methods():
            print(f"{name:<14} {get_method(name).summary}")
        return 0
    method = get_method(args.show_hparams)
    model, _ = load(args)
    from ..arch import describe

    hp = resolve_hparams(method, model, None, describe(model))
    print(json.dumps(hp.to_dict(), indent=2))
    return 0
