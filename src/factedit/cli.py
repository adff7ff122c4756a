"""The ``factedit`` command line. Parses, calls the library, prints; no algorithms here.

Each subcommand is a ``cmd_<name>(args)`` function registered in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="model: packaged name (smollm2-135m [default], gemma3-270m), a folder, a .gguf file or a hub id",
    )
    p.add_argument("--dtype", default=None, help="weights' dtype: float32 (default), bfloat16, float16")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default cpu)")


def _load(args: argparse.Namespace):
    from .models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import format_lens, generate, logit_lens

    model, tok = _load(args)
    texts = generate(model, tok, args.prompts, max_new_tokens=args.max_new_tokens, top_k=args.top_k, seed=args.seed)
    for t in texts:
        print(t)
    if args.logit_lens:
        for p in args.prompts:
            print(f"\nlogit lens for {p!r}:")
            print(format_lens(logit_lens(model, tok, p, top_k=args.lens_top_k)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .arch import describe

    model, tok = _load(args)
    arch = describe(model)
    info = {
        "model_class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype),
        "device": str(next(model.parameters()).device),
        "vocab_size": len(tok),
        "architecture": arch.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            if k == "architecture":
                print("architecture:")
                for ak, av in v.items():
                    print(f"  {ak:<24} {av}")
            else:
                print(f"{k:<26} {v:,}" if isinstance(v, int) else f"{k:<26} {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="factedit",
        description="Locate and edit factual knowledge in transformer language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="continue prompts with a model (greedy or top-k sampling)")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--top-k", type=int, default=None, help="sample from the top k tokens (default: greedy)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--logit-lens", action="store_true", help="also show each layer's top next tokens")
    p.add_argument("--lens-top-k", type=int, default=5)
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="show a model's size and architecture mapping")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    for register in _extra_commands():
        register(sub, _add_model_args)
    return parser


def _extra_commands():
    """``register`` functions of the modules in :data:`cli_commands.COMMAND_MODULES`."""
    import importlib

    from .cli_commands import COMMAND_MODULES

    registrars = []
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        registrars.append(module.register)
    return registrars


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, LookupError, OSError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"factedit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
