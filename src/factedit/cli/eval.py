"""``factedit eval``: CounterFact / zsRE evaluation of an editing method (parse, call, print)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from .common import add_model_args, load


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate an editing method on CounterFact or zsRE (resumable)",
        description=(
            "Edit each case, measure the ROME/MEMIT metrics before and after, append one JSON "
            "line per case to --out (a rerun resumes there), and print a table of means with "
            "95 % confidence intervals."
        ),
    )
    p.add_argument("--method", default="rome", help="editing method (default rome)")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="KIND_OR_PATH",
        help="[KIND] PATH: the dataset file, optionally preceded by its kind: counterfact (ROME or flat EasyEdit "
        "layout), counterfact-flat, zsre; detected from the records when left out",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    p.add_argument(
        "--out", default=None, help="results JSONL (default: eval-<method>-<data>.jsonl)"
    )
    p.add_argument(
        "--hparams", default=None, help="hyperparameters: a JSON/YAML file or inline JSON overrides"
    )
    p.add_argument(
        "--sequential", action="store_true", help="keep earlier edits in place (no restore)"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        help="sequential: re-measure all edits every K edits",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="mass editing (MEMIT/AlphaEdit protocol): edit N cases at once and measure them on the "
        "edited model; with --sequential the batches stay in place and everything is measured at the end",
    )
    p.add_argument(
        "--gen-sample",
        type=int,
        default=100,
        help="with --batch-size: measure generations (GE/RS) on a fixed sample of this many cases",
    )
    p.add_argument(
        "--no-generation", action="store_true", help="skip the generations (no GE/RS): much faster"
    )
    p.add_argument(
        "--gen-length",
        type=int,
        default=100,
        help="generation length in tokens incl. prompt (ROME: 100)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled generations")
    p.add_argument(
        "--markdown", default=None, metavar="FILE", help="also write the table as Markdown"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON")
    p.add_argument("--overwrite", action="store_true", help="discard an existing results file")
    p.add_argument(
        "--skip-invalid", action="store_true", help="skip malformed records instead of stopping"
    )
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="only print the summary of an existing --out file",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_eval)


def _parse_hparams(value: str | None) -> Any:
    if value is None:
        return None
    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--hparams is not valid JSON: {exc}") from None
        return data
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"hyperparameter file {path} does not exist")
    return path


def _data_args(values: list[str]) -> tuple[str | None, Path]:
    if len(values) == 1:
        return None, Path(values[0])
    if len(values) == 2:
        return values[0], Path(values[1])
    raise ValueError("--data takes [KIND] PATH")


def default_out(method: str, data: Path, sequential: bool, generation: bool, batch_size: int | None = None) -> Path:
    stem = re.sub(r"[^\w.-]", "_", f"eval-{method}-{data.stem}" + (f"-b{batch_size}" if batch_size else ""))
    return Path(stem + ("-seq" if sequential else "") + ("" if generation else "-nogen") + ".jsonl")


def _write_outputs(summary: Any, args: argparse.Namespace) -> None:
    print(summary.to_markdown())
    if args.markdown:
        Path(args.markdown).write_text(summary.to_markdown() + "\n", encoding="utf-8")
        print(f"\nMarkdown written to {args.markdown}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(summary.to_dict(), indent=2, default=str) + "\n", encoding="utf-8"
        )
        print(f"JSON written to {args.json}")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluate import load_dataset, make_config, read_results, run_evaluation, summarize
    from ..models import DEFAULT_MODEL

    kind, data = _data_args(args.data)
    generation = not args.no_generation
    out = (
        Path(args.out) if args.out else default_out(args.method, data, args.sequential, generation, args.batch_size)
    )
    if args.summary_only:
        _write_outputs(summarize(read_results(out)), args)
        return 0
    cases = load_dataset(data, kind, limit=args.limit, skip_invalid=args.skip_invalid)
    hparams = _parse_hparams(args.hparams)

    model, tok = load(args)
    model_name = (args.model or DEFAULT_MODEL) + (f"@{args.dtype}" if args.dtype else "")
    config = make_config(
        model,
        method=args.method,
        hparams=hparams,
        model_name=model_name,
        dataset=data,
        kind=cases[0].kind,
        sequential=args.sequential,
        checkpoint_every=args.checkpoint_every,
        generation=generation,
        gen_length=args.gen_length,
        seed=args.seed,
    )
    print(f"{len(cases)} cases from {data}; results -> {out}", file=sys.stderr)
    if args.batch_size is not None:
        from ..evaluate.batch import run_batch_evaluation

        summary = run_batch_evaluation(
            model, tok, cases, config, out, batch_size=args.batch_size, hparams=hparams,
            gen_sample=args.gen_sample, progress=not args.no_progress, overwrite=args.overwrite,
        )  # fmt: skip
        _write_outputs(summary, args)
        return 0
    summary = run_evaluation(
        model,
        tok,
        cases,
        config,
        out,
        hparams=hparams,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    _write_outputs(summary, args)
    return 0
