"""``factedit demo``, ``factedit chat`` and ``factedit apply``: the notebook session on the
command line, and saved edits turned into models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import Indicator, add_model_args, load, show_phases, status


def register(subparsers) -> None:
    from ..demo import EXAMPLES

    p = subparsers.add_parser(
        "demo",
        help="edit the default model with the research code's example (Steve Jobs -> Microsoft) "
        "and show probabilities and generations before/after",
        description=(
            "The research notebook's session: generate from the example's prompts, edit the "
            "model, generate again, and print target probabilities and the generations side "
            "by side. Each example starts from the unedited model."
        ),
    )
    p.add_argument(
        "--example",
        action="append",
        choices=[*EXAMPLES, "all"],
        help="which example(s) to run (repeatable; default steve-jobs)",
    )
    p.add_argument("--method", default="ROME", help="editing method (default ROME)")
    p.add_argument(
        "--hparams", default=None, help="hyperparameters file (JSON/YAML) overriding the defaults"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=40, help="tokens generated per prompt (default 40)"
    )
    p.add_argument(
        "--top-k", type=int, default=None, help="sample from the top k tokens (default: greedy)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument(
        "--save", default=None, metavar="FILE", help="save the (last) edit to FILE (.safetensors)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_model_args(p)
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser(
        "chat",
        help="type prompts and read the (edited) model's continuations, the original's beside them",
        description=(
            "An interactive prompt loop (the research notebook's generate_interactive). With "
            "--edits, the saved edits are applied and each prompt is continued by the edited "
            "and the original model (and, with --logit-lens, read through the logit lens of "
            "both). Ctrl-C cancels the current prompt; an empty line or Ctrl-D quits. Input "
            "can be piped: echo 'Steve Jobs worked for' | factedit chat --edits jobs.safetensors"
        ),
    )
    p.add_argument(
        "--edits",
        action="append",
        default=[],
        metavar="FILE",
        help="saved edit(s) to apply first, in order (repeatable); the original model is shown beside",
    )
    p.add_argument(
        "--logit-lens", action="store_true", help="also show each layer's top next tokens"
    )
    p.add_argument(
        "--lens-top-k", type=int, default=5, help="tokens per layer in the logit lens (default 5)"
    )
    p.add_argument(
        "--max-out-len", type=int, default=100, help="prompt + continuation tokens (default 100)"
    )
    p.add_argument(
        "--top-k", type=int, default=5, help="sample from the top k tokens; 1 = greedy (default 5)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling, per prompt")
    add_model_args(p)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser(
        "apply",
        help="apply saved edit(s) to a base model and write the edited model (save_pretrained)",
        description=(
            "Check that each saved edit was made on --model's weights, apply the edits in "
            "order and write the edited model with save_pretrained (plus factedit_edits.json "
            "naming the edits), so transformers can load it without factedit. Example: "
            "factedit apply jobs.safetensors --out edited-model/"
        ),
    )
    p.add_argument("edits", nargs="+", metavar="FILE", help="saved edit(s), applied in order")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for the edited model (must not exist or be empty)",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_apply)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import EXAMPLES, demo_model_editing
    from ..methods import EditContext

    names = args.example or ["steve-jobs"]
    if "all" in names:
        names = list(EXAMPLES)
    model, tok = load(args)
    result = None
    for name in dict.fromkeys(names):
        ex = EXAMPLES[name]
        print(f"=== {name} ===", flush=True)
        if not args.no_progress:
            status("generating before the edit, editing, generating after ...")
        with show_phases(not args.no_progress):
            _, orig = demo_model_editing(
                model,
                tok,
                ex.request,
                ex.generation_prompts,
                alg_name=args.method,
                hparams=args.hparams,
                max_new_tokens=args.max_new_tokens,
                top_k=args.top_k,
                seed=args.seed,
                context=EditContext(progress=not args.no_progress),
            )
        result = orig.result
        if args.save:
            path = result.save(args.save)
            print(f"saved the edit to {path}")
        # Each example starts from the unedited model, as in the research notebook.
        result.restore()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ..demo import generate_interactive
    from ..saving import apply_edits, load_edit

    # Read and check the files before the model loads, so a bad file fails fast.
    saved = [load_edit(p) for p in args.edits]
    model, tok = load(args)
    applied = None
    if saved:
        applied = apply_edits(model, saved)
        for a in applied:
            print(f"applied {a.saved.describe()}")
        print(
            "showing the edited model's continuation and the original's ([original]) for each prompt"
        )
    print("Ctrl-C cancels a prompt; an empty line or Ctrl-D quits")
    try:
        generate_interactive(
            model,
            tok,
            max_out_len=args.max_out_len,
            top_k=args.top_k,
            use_logit_lens=args.logit_lens,
            compare_against=applied,
            lens_top_k=args.lens_top_k,
            seed=args.seed,
            input_fn=_reader(),
            status=Indicator(),
        )
    finally:
        if applied is not None:
            applied.revert()
    return 0


def _reader():
    # input() echoes its prompt to stdout, but then the typed line only appears on a terminal;
    # with piped input, echo the line too, so a transcript reads like a session.
    interactive = sys.stdin.isatty()

    def read(prompt: str) -> str:
        line = input(prompt)
        if not interactive:
            print(line)
        return line

    return read


def cmd_apply(args: argparse.Namespace) -> int:
    from ..saving import apply_edits, edits_summary, load_edit

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose another --out")
    # Validate the files before loading the model, so a bad file fails fast.
    saved = [load_edit(p) for p in args.edits]
    model, tok = load(args)
    applied = apply_edits(model, saved)
    for a in applied:
        print(f"applied {a.saved.describe()}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "factedit_edits.json").write_text(
        json.dumps({"base_model": args.model or "default", "edits": edits_summary(saved)}, indent=2)
    )
    print(f"wrote the edited model to {out}")
    return 0


def save_result(result, path: str | Path) -> Path:
    """For ``factedit edit ... --save FILE``: save ``result`` and print where (CLI helper)."""
    written = result.save(path)
    print(f"saved the edit to {written} (apply with: factedit apply {written} --out DIR)")
    return written
