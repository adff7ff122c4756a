"""``factedit generate`` and ``factedit info``: look at a model without changing it."""

from __future__ import annotations

import argparse
import json

from .common import add_model_args, load


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="continue prompts with a model (greedy or top-k sampling), optionally with the logit lens",
        description="Continue each PROMPT; --logit-lens also shows each layer's top next tokens.",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate (default 30)")
    p.add_argument(
        "--top-k", type=int, default=None, help="sample from the top k tokens (default: greedy)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument(
        "--logit-lens", action="store_true", help="also show each layer's top next tokens"
    )
    p.add_argument(
        "--lens-top-k", type=int, default=5, help="tokens per layer in the logit lens (default 5)"
    )
    add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "info",
        help="show a model's size and where factedit finds its layers, MLPs, attention and head",
        description="Load a model and print its parameter count, dtype, device and architecture mapping.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_args(p)
    p.set_defaults(func=cmd_info)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generation import format_lens, generate, logit_lens

    model, tok = load(args)
    texts = generate(
        model,
        tok,
        args.prompts,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        seed=args.seed,
    )
    for t in texts:
        print(t)
    if args.logit_lens:
        for p in args.prompts:
            print(f"\nlogit lens for {p!r}:")
            print(format_lens(logit_lens(model, tok, p, top_k=args.lens_top_k)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..arch import describe

    model, tok = load(args)
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
        return 0
    for k, v in info.items():
        if k == "architecture":
            print("architecture:")
            for ak, av in v.items():
                print(f"  {ak:<24} {av}")
        else:
            print(f"{k:<26} {v:,}" if isinstance(v, int) else f"{k:<26} {v}")
    return 0
