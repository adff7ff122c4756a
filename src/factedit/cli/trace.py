"""``factedit trace``: causal tracing of one prompt, or averaged over a file of facts."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .common import add_model_args, load, status


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trace",
        help="causal tracing: which layers and tokens carry a fact",
        description=(
            "Corrupt the subject's embeddings with noise and restore single states from the "
            "clean run. With a PROMPT: writes a heatmap per kind (PNG, SVG) and trace.json to "
            "--out. With --facts: averages indirect effects over many facts (ROME's "
            "known-facts format), caching per-fact results in --out/trace_cache.jsonl so an "
            "interrupted run resumes."
        ),
    )
    p.add_argument(
        "prompt", nargs="?", help="the prompt, e.g. 'The Eiffel Tower is located in the city of'"
    )
    p.add_argument("--subject", help="the subject inside the prompt (with PROMPT)")
    p.add_argument(
        "--answer", default=None, help="answer to trace (default: the model's top prediction)"
    )
    p.add_argument(
        "--allow-any-answer", action="store_true",
        help="trace --answer even if the model does not predict it",
    )  # fmt: skip
    p.add_argument(
        "--facts", type=Path, help="JSON/JSONL file of facts (subject, prompt, attribute)"
    )
    p.add_argument("--limit", type=int, default=None, help="with --facts: use the first N facts")
    p.add_argument(
        "--all-facts", action="store_true",
        help="with --facts: also trace facts whose attribute the model does not predict",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--kinds", default="hidden,mlp,attn", help="comma-separated: hidden, mlp, attn")
    p.add_argument(
        "--samples", type=int, default=10, help="noise samples per restoration (default 10)"
    )
    p.add_argument(
        "--window", type=int, default=10, help="layers restored together for mlp/attn (default 10)"
    )
    p.add_argument(
        "--noise", default="s3",
        help="noise std: a number, or sK = K x the std of the input embeddings (default s3)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument(
        "--batch-size", type=int, default=128, help="rows per forward pass (default 128)"
    )
    p.add_argument("--formats", default="png,svg", help="image formats (default png,svg)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_args(p)
    p.set_defaults(func=cmd_trace)


def _kinds(text: str) -> list[str]:
    from ..tracing import KINDS

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--kinds: unknown kind(s) {bad}; use some of {','.join(KINDS)}")
    return kinds


def cmd_trace(args: argparse.Namespace) -> int:
    kinds = _kinds(args.kinds)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if (args.prompt is None) == (args.facts is None):
        raise ValueError("give either a PROMPT (with --subject) or --facts FILE")
    if args.prompt is not None and not args.subject:
        raise ValueError("--subject is required with a PROMPT")
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"--out {args.out} exists and is not a folder")
    # Everything that can fail is checked before --out is created, so a failed run leaves no
    # empty folder behind.
    facts = None
    if args.facts is not None:
        from ..tracing import load_facts

        facts = load_facts(args.facts)
    model, tok = load(args)
    if facts is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        return _trace_facts(args, model, tok, facts, kinds, formats)
    return _trace_prompt(args, model, tok, kinds, formats)


def _trace_prompt(args, model, tok, kinds, formats) -> int:
    from ..trace_plot import plot_trace
    from ..tracing import AnswerNotPredictedError, CausalTracer

    status("running the clean and corrupted passes ...")
    try:
        tracer = CausalTracer(
            model, tok, args.prompt, args.subject, args.answer, noise=args.noise,
            samples=args.samples, seed=args.seed, batch_size=args.batch_size,
            allow_any_answer=args.allow_any_answer,
        )  # fmt: skip
    except AnswerNotPredictedError as exc:
        raise ValueError(exc.describe("give --allow-any-answer")) from None
    if tracer.answer_is_top_prediction:
        status(
            f"no --answer given: tracing the model's top prediction {tracer.answer!r} "
            f"(p={tracer.clean_prob:.3f}); give --answer to trace the answer you expect"
        )
        # Below UNSURE_PROB the library has already logged a warning (shown on stderr).
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"answer {tracer.answer!r}: clean p={tracer.clean_prob:.4f}, corrupted p="
        f"{tracer.corrupt_prob:.4f} (noise std {tracer.noise_std:.4g}, {tracer.samples} samples)"
    )
    results = {}
    for kind in kinds:
        result = tracer.trace(kind, args.window, progress=not args.no_progress)
        results[kind] = result.to_dict()
        for path in plot_trace(result, args.out / f"trace_{kind}", formats=formats):
            print(f"wrote {path}")
        best = divmod(int(result.grid.argmax()), result.grid.shape[1])
        print(
            f"  {kind}: strongest restoration p={float(result.grid.max()):.4f} at token "
            f"{best[0]} {result.tokens[best[0]]!r}, layer {result.layers[best[1]]}"
        )
    path = args.out / "trace.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


def _trace_facts(args, model, tok, facts, kinds, formats) -> int:
    from ..trace_plot import plot_average
    from ..tracing import average_trace

    avg = average_trace(
        model, tok, facts, kinds=kinds, limit=args.limit, cache=args.out / "trace_cache.jsonl",
        noise=args.noise, samples=args.samples, window=args.window, seed=args.seed,
        batch_size=args.batch_size, require_known=not args.all_facts,
        progress=not args.no_progress,
    )  # fmt: skip
    print(
        f"{avg.n_facts} facts traced, {avg.n_skipped} skipped ({avg.n_cached} of the "
        f"{avg.n_facts + avg.n_skipped} read from the cache); mean clean p={avg.mean_clean_prob:.4f}, "
        f"corrupted p={avg.mean_corrupt_prob:.4f}"
    )
    (args.out / "average.json").write_text(json.dumps(avg.to_dict(), indent=1))
    print(f"wrote {args.out / 'average.json'}")
    if avg.n_facts == 0:
        print("no fact was traced: nothing to plot (see 'skipped' in average.json)")
        return 1
    for path in plot_average(avg, args.out / "average_effects", formats=formats):
        print(f"wrote {path}")
    for kind in kinds:
        values = avg.effects[kind]["last subject token"]
        if all(math.isnan(v) for v in values):
            continue
        peak = avg.peak_layer(kind, "last subject token")
        row = " ".join(f"{v:+.3f}" for v in values)
        print(f"{kind} AIE at the last subject token by layer: {row}")
        print(f"  peak at layer {peak} ({values[peak]:+.4f})")
    return 0
