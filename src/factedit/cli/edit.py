"""``factedit edit`` and ``factedit stats``."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .common import (
    add_corpus_arg,
    add_model_args,
    check_corpus,
    load,
    parse_hparams,
    show_phases,
    status,
)


def register(sub) -> None:
    p = sub.add_parser(
        "edit",
        help="write a fact into a model and show probabilities and generations before/after",
        description=(
            "Edit a model with one request (--prompt/--subject/--target) or a JSON file of "
            "requests in the research code's format (--requests). Example: factedit edit "
            "--prompt '{} was the founder of' --subject 'Steve Jobs' --target Microsoft "
            "--generate 'Steve Jobs worked for'"
        ),
    )
    p.add_argument(
        "--prompt", help="prompt with '{}' where the subject goes (or containing the subject)"
    )
    p.add_argument("--subject", help="the subject, e.g. 'Steve Jobs'")
    p.add_argument("--target", help="the new target, e.g. 'Microsoft'")
    p.add_argument("--target-true", default=None, help="the current target (shown for comparison)")
    p.add_argument(
        "--requests", type=Path,
        help="requests file: a JSON list (or one dict) or JSONL, in the research code's format; every record is "
        "checked before any weight changes",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=int, default=None,
        help="requests per batch (MEMIT/AlphaEdit edit a batch at once, batches one after another; "
        "other methods always go one request at a time); default: all at once",
    )  # fmt: skip
    p.add_argument(
        "--method",
        default="rome",
        help="editing method (see 'factedit methods'; e.g. rome, memit, alphaedit, ft-l, kn, mend-cf)",
    )
    p.add_argument(
        "--hparams",
        default=None,
        help="hyperparameters: a JSON/YAML file or an inline JSON object of overrides",
    )
    p.add_argument("--layer", type=int, default=None, help="override the edited layer (ROME)")
    p.add_argument(
        "--generate",
        nargs="*",
        default=[],
        metavar="PROMPT",
        help="prompts to generate from before and after",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=25, help="tokens generated per prompt (default 25)"
    )
    p.add_argument(
        "--save", type=Path, default=None, help="save the edit (safetensors) to this file"
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="hide progress bars and the progress lines on stderr",
    )
    add_corpus_arg(p)
    add_model_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser(
        "stats",
        help="compute and cache the second-moment statistics ROME uses for a layer",
        description=(
            "Compute C = E[k kᵀ] over the inputs k of one layer's MLP output projection on a "
            "text corpus (default: the packaged Wikipedia lead paragraphs) and cache it, so "
            "later edits at that layer start at once. Example: factedit stats --layer 4. Under "
            "torchrun (torchrun --nproc-per-node N -m factedit stats ...) the processes share "
            "the corpus and sum their parts: the same matrix and cache entry as one process."
        ),
    )
    p.add_argument(
        "--layer",
        type=int,
        required=True,
        help="block whose MLP output projection's inputs are measured",
    )
    p.add_argument(
        "--tokens", type=int, default=None, help="corpus tokens (default: ROME's mom2_tokens)"
    )
    p.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="text/JSON/JSONL corpus (default: packaged Wikipedia)",
    )
    p.add_argument(
        "--recompute",
        action="store_true",
        help="compute afresh, without reading or writing the cache",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_stats)


def _hparams_arg(args: argparse.Namespace):
    hp = parse_hparams(args.hparams)
    if args.layer is not None:
        if hp is None:
            hp = {}
        if not isinstance(hp, dict):
            raise ValueError(
                "--layer cannot be combined with an --hparams file; put the layer in the file"
            )
        key = "layer" if args.method.lower() == "rome" else "layers"
        hp[key] = args.layer if key == "layer" else [args.layer]
    return hp


def _requests(args: argparse.Namespace):
    from ..requests import EditRequest

    if args.requests is not None:
        if any(v is not None for v in (args.prompt, args.subject, args.target)):
            raise ValueError("give either --requests or --prompt/--subject/--target, not both")
        from ..requests import load_requests

        return load_requests(args.requests)
    missing = [
        n
        for n, v in (
            ("--prompt", args.prompt),
            ("--subject", args.subject),
            ("--target", args.target),
        )
        if v is None
    ]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give --requests FILE)")
    if "{}" in args.prompt:
        return [EditRequest(args.prompt, args.subject, args.target, target_true=args.target_true)]
    return [
        EditRequest.from_filled(
            args.prompt, args.subject, args.target, target_true=args.target_true
        )
    ]


def cmd_edit(args: argparse.Namespace) -> int:
    from ..generation import generate
    from ..methods import EditContext, get_method, warn_subject_at_end
    from ..requests import SubjectAtEndWarning
    from ..scoring import target_prob
    from ..session import EditSession

    requests = _requests(args)
    get_method(args.method)  # an unknown method fails before the model is loaded
    hparams = _hparams_arg(args)
    if args.save is not None and args.save.is_dir():
        raise IsADirectoryError(f"--save {args.save} is a folder; give a file name")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    check_corpus(args.corpus)
    model, tok = load(args)
    # Everything that can be checked is checked before the first batch changes any weight.
    for r in requests:
        r.check_tokenizer(tok)
    progress = not args.no_progress
    # Said once, up front: the session below checks the hyperparameters first and may stop.
    warn_subject_at_end(requests)
    session = EditSession(
        model,
        tok,
        method=args.method,
        hparams=hparams,
        context=EditContext(progress=progress, stats_corpus=args.corpus),
    )
    gen_prompts = args.generate or [r.text for r in requests][:10]
    if progress:
        status(f"generating {len(gen_prompts)} continuation(s) before the edit ...")
    before = generate(model, tok, gen_prompts, max_new_tokens=args.max_new_tokens)
    if progress:
        status(f"editing with {args.method} ({len(requests)} request(s)) ...")
    size = args.batch_size or len(requests)
    try:
        with show_phases(progress), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=SubjectAtEndWarning)
            for s in range(0, len(requests), size):
                session.apply(requests[s : s + size])
    except BaseException:
        session.revert_all()
        raise
    result = session.combined()
    if progress:
        status("generating after the edit ...")
    after = generate(model, tok, gen_prompts, max_new_tokens=args.max_new_tokens)
    n_batches = len(session)
    print(
        f"method {result.method}; {len(requests)} request(s) in {n_batches} batch(es); edit took "
        f"{result.timings['total']:.1f} s ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items() if k != "total")
        + ")"
    )
    shown = 20
    for r, d in list(zip(result.requests, result.diagnostics, strict=True))[:shown]:
        line = f"  {r.text!r} -> {r.target_text!r}: P before {d.get('target_prob_before', float('nan')):.4f}, after {d.get('target_prob_after', float('nan')):.4f}"
        if r.target_true is not None:
            pt = target_prob(model, tok, [r.text], [r.true_text]).item()
            line += f"; P({r.true_text!r}) after {pt:.4f}"
        print(line)
    if len(result.requests) > shown:
        after_p = [d.get("target_prob_after", float("nan")) for d in result.diagnostics]
        better = sum(
            d.get("target_prob_after", 0) > d.get("target_prob_before", 1)
            for d in result.diagnostics
        )
        print(
            f"  ... {len(result.requests) - shown} more; P(new target) rose for {better}/{len(after_p)} requests"
        )
    print()
    for b, a in zip(before, after, strict=True):
        print(f"[before] {b}")
        print(f"[after]  {a}")
        print()
    if args.save is not None:
        path = result.save(args.save)
        print(f"saved the edit to {path}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from ..arch import describe
    from ..methods.rome import ROMEHParams
    from ..stats import layer_stats
    from .common import (
        finish_distributed,
        init_distributed,
        is_main_process,
        torch_distributed_world,
    )

    distributed = init_distributed(args.device)
    try:
        model, tok = load(args)
        arch = describe(model)
        tokens = args.tokens or ROMEHParams.defaults_for("rome", model, arch).mom2_tokens
        s = layer_stats(
            model, tok, args.layer, arch=arch, corpus=args.corpus, tokens=tokens,
            use_cache=not args.recompute, distributed=distributed,
        )  # fmt: skip
    finally:
        finish_distributed()
    if is_main_process():
        procs = f" by {torch_distributed_world()} processes" if distributed else ""
        where = (
            "read from the cache"
            if s.from_cache
            else f"computed{procs} in {s.seconds:.1f} s ({s.count / max(s.seconds, 1e-9):.0f} tokens/s)"
        )
        print(
            f"layer {args.layer} ({arch.mlp_out_name(args.layer)} input): {s.count} tokens, {where}; key {s.key}",
            file=sys.stdout,
        )
    return 0
