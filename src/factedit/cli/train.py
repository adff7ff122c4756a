"""``factedit train mend|ke``: train a learned editor for the loaded model."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_args, load, parse_hparams, status


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a learned editor (MEND or KE) for the model",
        description=(
            "Train a hypernetwork editor for the loaded model and cache it, so that "
            "'factedit edit --method mend-cf' (etc.) can use it. Variants: cf (CounterFact, flat "
            "layout, e.g. --data ../shared/data/counterfact/counterfact-train.json; subjects of a "
            "counterfact_dev.json beside it are excluded), zsre (MEND's layout, e.g. --data "
            "../shared/data/zsre/zsre_extra_2500.json), gen (self-supervised edits from the "
            "packaged Wikipedia corpus, or --data CORPUS). Rerunning an interrupted command "
            "continues from its checkpoint; rerunning a finished one returns the cached editor."
        ),
    )
    p.add_argument("family", choices=["mend", "ke"], help="which editor")
    p.add_argument(
        "--variant",
        choices=["gen", "cf", "zsre"],
        default="gen",
        help="training data (default gen)",
    )
    p.add_argument(
        "--data", type=Path, default=None, help="training data file (cf, zsre) or corpus (gen)"
    )
    p.add_argument(
        "--exclude",
        type=Path,
        default=None,
        help="CounterFact file whose subjects are left out of training (cf)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the shipped config)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the editor (default: the factedit cache)",
    )
    p.add_argument(
        "--hparams", default=None, help="training hyperparameters: JSON/YAML file or inline JSON"
    )
    p.add_argument(
        "--restart", action="store_true", help="ignore an existing checkpoint and start over"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..learned import TrainingInterrupted, train_editor
    from ..learned.data import evaluation_subjects

    hp = parse_hparams(args.hparams)
    if isinstance(hp, Path):
        from ..learned import LearnedHParams

        hp = LearnedHParams.from_file(hp).to_dict()
        hp.pop("family", None)
    exclude = evaluation_subjects(args.exclude) if args.exclude is not None else None
    model, tok = load(args)
    status(f"training {args.family}-{args.variant} ...")
    try:
        result = train_editor(
            model, tok, args.family, args.variant, args.data, hparams=hp, steps=args.steps, out=args.out,
            exclude_subjects=exclude, model_name=args.model, progress=not args.no_progress, resume=not args.restart,
        )  # fmt: skip
    except TrainingInterrupted as exc:
        status(str(exc))
        return 130
    h = result.header
    if result.from_cache:
        print(f"already trained: {result.path}")
    else:
        print(
            f"trained {args.family}-{args.variant} in {h['seconds']:.0f} s ({h['steps_done']} steps"
            + (", stopped early" if h["stopped_early"] else "")
            + f"); best at step {h['best_step']}"
        )
    print(f"data: {h['data']}")
    print("step  train_loss  edit_acc  rephrase_acc  locality")
    for c in h["curve"]:
        tl = "-" if c["train_loss"] is None else f"{c['train_loss']:.3f}"
        print(
            f"{c['step']:>5}  {tl:>10}  {c['edit_acc']:8.3f}  {c['rephrase_acc']:12.3f}  {c['locality']:8.3f}"
        )
    print(f"editor: {result.path}")
    return 0
