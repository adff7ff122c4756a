"""``factedit eval``: CounterFact / zsRE evaluation of an editing method (parse, call, print)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from .common import add_corpus_arg, add_model_args, check_corpus, load


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
    p.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N records (after --skip)"
    )
    p.add_argument(
        "--skip", type=int, default=0, metavar="N",
        help="leave out the first N records (with --limit: records N..N+limit-1), e.g. to report "
        "on records that took no part in choosing hyperparameters",
    )  # fmt: skip
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
        "--checkpoint-gen",
        type=int,
        default=0,
        metavar="N",
        help="sequential: at every checkpoint (and once before the first edit) also measure the "
        "fluency GE on the generation prompts of the first N cases",
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
        "--gen-checkpoints",
        default="",
        metavar="K,K,...",
        help="with --batch-size and --sequential: measure the sample's fluency (GE) also after these "
        "batches (1-based), on the cases edited so far and on those not edited yet",
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
    p.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="run only shard K of N (cases K, K+N, ...; K from 0) into its own results file; "
        "join the shards' files with 'factedit merge'. Under torchrun the processes share "
        "the cases by themselves and write one merged --out",
    )
    p.add_argument(
        "--no-pre-cache",
        action="store_true",
        help="measure every case before its edit again instead of reading the cached pre-edit "
        "measurement (cached under factedit's cache folder, keyed on the exact weights, data, "
        "settings, threads and measuring code)",
    )
    add_corpus_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_eval)

    m = subparsers.add_parser(
        "merge",
        help="join the results files of evaluation shards into one (and print its table)",
        description=(
            "Join results files of one evaluation configuration (e.g. from 'factedit eval "
            "--shard K/N' on several machines) into one file ordered by case id, and print "
            "its table. Example: factedit merge part0.jsonl part1.jsonl --out results.jsonl"
        ),
    )
    m.add_argument("files", nargs="+", type=Path, help="results files to join")
    m.add_argument("--out", required=True, type=Path, help="merged results file")
    m.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not among the inputs",
    )
    m.add_argument(
        "--markdown", default=None, metavar="FILE", help="also write the table as Markdown"
    )
    m.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON")
    m.set_defaults(func=cmd_merge)


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


def _batches(value: str) -> list[int]:
    """``--gen-checkpoints "1,2,5"`` -> ``[1, 2, 5]``."""
    try:
        return [int(k) for k in value.split(",") if k.strip()]
    except ValueError:
        raise ValueError(
            f"--gen-checkpoints takes batch numbers separated by commas, got {value!r}"
        ) from None


def _data_args(values: list[str]) -> tuple[str | None, Path]:
    if len(values) == 1:
        return None, Path(values[0])
    if len(values) == 2:
        return values[0], Path(values[1])
    raise ValueError("--data takes [KIND] PATH")


def default_out(
    method: str,
    data: Path,
    sequential: bool,
    generation: bool,
    shard: tuple[int, int] | None = None,
    skip: int = 0,
    batch_size: int | None = None,
) -> Path:
    stem = re.sub(
        r"[^\w.-]", "_", f"eval-{method}-{data.stem}" + (f"-b{batch_size}" if batch_size else "")
    )
    stem += f"-from{skip}" if skip else ""
    part = f"-shard{shard[0]}of{shard[1]}" if shard else ""
    return Path(
        stem + ("-seq" if sequential else "") + ("" if generation else "-nogen") + part + ".jsonl"
    )


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
    from ..evaluate import load_dataset, read_results, summarize
    from ..evaluate.sharding import parse_shard, shard_cases
    from ..methods import get_method
    from .common import finish_distributed, init_distributed

    kind, data = _data_args(args.data)
    generation = not args.no_generation
    shard = parse_shard(args.shard) if args.shard else None
    out = (
        Path(args.out)
        if args.out
        else default_out(
            args.method, data, args.sequential, generation, shard, args.skip, args.batch_size
        )
    )
    if args.summary_only:
        _write_outputs(summarize(read_results(out)), args)
        return 0
    if _batches(args.gen_checkpoints) and not (args.batch_size and args.sequential):
        raise ValueError(
            "--gen-checkpoints needs --batch-size and --sequential (fluency after each listed batch)"
        )
    if shard and args.sequential:
        raise ValueError(
            "--shard cannot split a --sequential run: each edit depends on all earlier cases"
        )
    # Everything is validated before the results file is touched: the method and the dataset
    # now, the hyperparameters against the model in make_config (which raises on a bad field
    # or value), so a failed run leaves nothing behind.
    get_method(args.method)
    if args.skip < 0:
        raise ValueError(f"--skip must be >= 0, got {args.skip}")
    check_corpus(args.corpus)
    limit = None if args.limit is None else args.skip + args.limit
    cases = load_dataset(data, kind, limit=limit, skip_invalid=args.skip_invalid)[args.skip :]
    if not cases:
        raise ValueError(f"{data} holds no usable records")
    if shard:
        cases = shard_cases(cases, *shard)
        if not cases:
            raise ValueError(f"shard {args.shard} of {args.limit or 'all'} records is empty")
    distributed = init_distributed(args.device)
    try:
        return _evaluate(args, data, cases, out, generation, distributed)
    finally:
        finish_distributed()


def _evaluate(
    args: argparse.Namespace,
    data: Path,
    cases: list,
    out: Path,
    generation: bool,
    distributed: bool,
) -> int:
    from ..evaluate import ConfigMismatchError, make_config, run_evaluation
    from ..evaluate.sharding import run_distributed_evaluation
    from ..models import DEFAULT_MODEL
    from .common import is_main_process

    if distributed and args.sequential:
        raise ValueError(
            "a --sequential run cannot be split over processes (run it without torchrun)"
        )
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
        checkpoint_gen=args.checkpoint_gen,
        generation=generation,
        gen_length=args.gen_length,
        seed=args.seed,
        stats_corpus=args.corpus,
    )
    if is_main_process():
        print(f"{len(cases)} cases from {data}; results -> {out}", file=sys.stderr)
    if args.batch_size is not None:
        if distributed:
            raise ValueError(
                "--batch-size runs cannot be split over processes (run without torchrun)"
            )
        from ..evaluate.batch import run_batch_evaluation

        summary = run_batch_evaluation(
            model, tok, cases, config, out, batch_size=args.batch_size, hparams=hparams,
            gen_sample=args.gen_sample, progress=not args.no_progress, overwrite=args.overwrite,
            pre_cache=not args.no_pre_cache, gen_checkpoints=_batches(args.gen_checkpoints),
        )  # fmt: skip
        _write_outputs(summary, args)
        return 0
    run = run_distributed_evaluation if distributed else run_evaluation
    if distributed:
        _shared_statistics(model, tok, config.hparams, args.corpus)
    try:
        summary = run(
            model,
            tok,
            cases,
            config,
            out,
            hparams=hparams,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            # Processes under torchrun would append to one cache file at once.
            pre_cache=not (args.no_pre_cache or distributed),
        )
    except ConfigMismatchError as exc:
        raise ValueError(exc.describe("--overwrite")) from None
    if is_main_process():
        _write_outputs(summary, args)
    return 0


def _shared_statistics(
    model: Any, tok: Any, hparams: dict[str, Any] | None, corpus: Path | None
) -> None:
    """Under torchrun, compute the method's covariance statistics once, split over the
    processes, before the cases (each process's edits then read them from the cache)."""
    from ..stats import layer_stats

    hp = hparams or {}
    if not hp.get("mom2_adjustment") or not hp.get("mom2_tokens"):
        return
    layers = hp.get("layers") or ([hp["layer"]] if "layer" in hp else [])
    for layer in layers:
        layer_stats(
            model, tok, int(layer), tokens=int(hp["mom2_tokens"]), corpus=corpus, distributed=True
        )


def cmd_merge(args: argparse.Namespace) -> int:
    from ..evaluate import summarize
    from ..evaluate.sharding import merge_results

    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"results file(s) {', '.join(missing)} do not exist")
    if (
        args.out.exists()
        and not args.overwrite
        and args.out.resolve() not in {f.resolve() for f in args.files}
    ):
        raise FileExistsError(
            f"{args.out} exists; give --overwrite to replace it, or list it among the files to merge"
        )
    merged = merge_results(args.files, args.out)
    print(f"{len(merged.cases)} cases from {len(args.files)} files -> {args.out}", file=sys.stderr)
    _write_outputs(summarize(merged), args)
    return 0
