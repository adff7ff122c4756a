"""Mass and sequential editing on CounterFact: MEMIT / AlphaEdit batches, and ROME one by one.

Edits N CounterFact records with the MEMIT/AlphaEdit protocol (:mod:`factedit.evaluate.batch`):
all N in batches of ``--batch-size`` (each batch on the unedited model, or with
``--sequential`` one batch after another and everything measured at the end), and prints
ES/PS/NS (and GE on a fixed sample) before and after, wall-clock seconds all-in and per fact,
peak resident memory, the thread count and the command to reproduce.

    python bench/bench_mass_editing.py --method memit --n 1000 --batch-size 1000
    python bench/bench_mass_editing.py --method memit --n 1000 --edit-only --threads 2   # the time bar
    python bench/bench_mass_editing.py --method alphaedit,memit --n 1000 --batch-size 100 --sequential
        # both methods in one process on the same records, then a table side by side
    python bench/bench_mass_editing.py --method alphaedit --n 1000 --batch-size 100 --sequential \
        --gen-checkpoints 1,2,5   # GE after batches 1, 2, 5 (edited / not yet edited cases) and at the end
    python bench/bench_mass_editing.py --method rome --n 300 --batch-size 1 --sequential \
        --checkpoint-every 50 [--hparams '{"original_key_bug": true}']   # ROME's collapse curve

``--offset`` skips records (tune on records >= 200 of the dev file, report on the first 200 or
on the flat train file). Pre-edit measurements are read from factedit's cache when an
earlier run measured the same records on the same model and settings (``--no-pre-cache``
measures again). ``--data`` takes the flat ``counterfact-train.json`` or ROME's
``counterfact_dev.json`` (default). The ROME collapse curve uses the sequential runner
(:func:`factedit.evaluate.run_evaluation`) with checkpoints that re-measure all edits so far.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def data_path(name: str) -> Path:
    base = Path(os.environ.get("FACTEDIT_DATA_DIR", REPO.parent / "shared" / "data"))
    return base / "counterfact" / name


def batches_list(text: str) -> tuple[int, ...]:
    """``"1,2,5"`` -> ``(1, 2, 5)``."""
    return tuple(int(k) for k in text.split(",") if k.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--method",
        default="memit",
        help="a method, or several separated by commas: evaluated one after another in this "
        "process on the same records (the pre-edit half measured once), then a table side by side",
    )
    ap.add_argument("--n", type=int, default=100, help="records edited")
    ap.add_argument("--offset", type=int, default=0, help="skip this many records first")
    ap.add_argument("--batch-size", type=int, default=None, help="default: all N in one batch")
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument(
        "--checkpoint-every", type=int, default=50, help="ROME sequential: re-measure every K edits"
    )
    ap.add_argument(
        "--gen-sample", type=int, default=100, help="cases with generations (GE); 0: none"
    )
    ap.add_argument(
        "--checkpoint-gen",
        type=int,
        default=20,
        help="ROME sequential: GE of the first N cases' generation prompts at every checkpoint",
    )
    ap.add_argument(
        "--gen-checkpoints",
        type=batches_list,
        default=(),
        metavar="K,K,...",
        help="sequential batches: GE of the sample also after these batches (1-based), "
        "on the cases edited so far and on those not edited yet",
    )
    ap.add_argument("--hparams", default=None, help="inline JSON overrides")
    ap.add_argument(
        "--data",
        default="counterfact_dev.json",
        help="file name under shared/data/counterfact or a path",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results JSONL (default: a temporary file)")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument(
        "--no-pre-cache",
        action="store_true",
        help="measure before the edits again instead of reading factedit's pre-edit cache",
    )
    ap.add_argument(
        "--edit-only",
        action="store_true",
        help="time the edit of all N in one call (no measuring): seconds per phase, per fact, peak RSS",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.edit_only:
        return time_edit(args)

    from factedit import load_model
    from factedit.evaluate import load_dataset

    path = Path(args.data) if Path(args.data).is_file() else data_path(args.data)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    hparams = json.loads(args.hparams) if args.hparams else None
    per_method = isinstance(hparams, dict) and len(methods) > 1 and set(hparams) <= set(methods)
    t_all = time.perf_counter()
    model, tok = load_model()
    cases = load_dataset(path, limit=args.offset + args.n)[args.offset :]
    summaries = {}
    for i, method in enumerate(methods):
        hp = (hparams or {}).get(method) if per_method else hparams
        out = (
            Path(args.out).with_suffix(f".{method}.jsonl")
            if args.out and len(methods) > 1
            else args.out
        )
        summaries[method] = evaluate(
            args, model, tok, cases, path, method, hp, out, t_all if i == 0 else None
        )
    if len(summaries) > 1:
        print(side_by_side(summaries))
        print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))


def evaluate(args: argparse.Namespace, model, tok, cases, path: Path, method: str, hparams, out,
             t_all: float | None):  # fmt: skip
    """One method's run on ``cases`` (the model is unedited again when it returns); prints its
    table and figures and returns its summary."""
    from factedit.evaluate import make_config, run_evaluation
    from factedit.evaluate.batch import run_batch_evaluation

    t_start = time.perf_counter() if t_all is None else t_all
    batch = args.batch_size or len(cases)
    generation = args.gen_sample > 0
    cfg = make_config(model, method=method, hparams=hparams, model_name="smollm2-135m", dataset=path,
                      kind="counterfact", sequential=args.sequential,
                      checkpoint_every=args.checkpoint_every if method == "rome" else None,
                      checkpoint_gen=args.checkpoint_gen if method == "rome" else 0,
                      # ROME one by one: per-case generations would cost more than the edits;
                      # its fluency curve comes from the checkpoints.
                      generation=generation and method != "rome")  # fmt: skip
    tmp = tempfile.TemporaryDirectory()
    out = Path(out) if out else Path(tmp.name) / "results.jsonl"
    pre_cache = not args.no_pre_cache
    t0 = time.perf_counter()
    if method.lower() == "rome" or batch == 1:
        summary = run_evaluation(
            model, tok, cases, cfg, out, hparams=hparams, overwrite=True, pre_cache=pre_cache
        )
    else:
        summary = run_batch_evaluation(model, tok, cases, cfg, out, batch_size=batch, hparams=hparams,
                                       gen_sample=args.gen_sample, overwrite=True, pre_cache=pre_cache,
                                       gen_checkpoints=args.gen_checkpoints)  # fmt: skip
    seconds = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    edit_s = sum(v.mean * v.n for k, v in summary.seconds.items() if k == "edit")
    print(summary.to_markdown())
    print()
    if args.sequential and 1 < batch < len(cases):
        print(per_batch(out, cases, batch))
        print()
    report(args, f"{method}: {len(cases)} edits of {path.name}[{args.offset}:{args.offset + len(cases)}] in "
                 f"batches of {batch}{', sequential' if args.sequential else ''}",
           f"editing {edit_s:.0f} s ({edit_s / len(cases):.2f} s per fact); evaluation run {seconds:.0f} s; "
           f"{'all-in' if t_all is not None else 'since the last method'} {total:.0f} s"
           f"{' incl. model load' if t_all is not None else ''}; peak RSS {peak_gb:.2f} GB (the process so far)",
           {**summary.to_dict(), "edit_seconds": edit_s, "run_seconds": seconds, "all_in_seconds": total,
            "peak_rss_gb": peak_gb}, suffix=method if "," in args.method else None)  # fmt: skip
    return summary


def per_batch(out: Path, cases: list, batch: int) -> str:
    """A sequential run's rates per batch, all measured on the final model: how much of each
    batch the batches after it left standing (Markdown)."""
    from factedit.evaluate.results import read_results, summarize

    results = read_results(out)
    metrics = ["ES", "PS", "NS", "EM"]
    lines = ["Per batch, measured at the end (batch 1 was written first):", "",
             "| batch | " + " | ".join(metrics) + " |", "| ---: | " + " | ".join("---:" for _ in metrics) + " |"]  # fmt: skip
    for b, s in enumerate(range(0, len(cases), batch)):
        post = summarize(results, [c.case_id for c in cases[s : s + batch]]).post
        lines.append(
            f"| {b + 1} | "
            + " | ".join(post[m].format(100.0, 1) if m in post else "-" for m in metrics)
            + " |"
        )
    return "\n".join(lines)


def side_by_side(summaries: dict) -> str:
    """One Markdown table: each metric before the edits (the same unedited model for every
    method) and after each method."""
    from factedit.evaluate.metrics import table_format

    first = next(iter(summaries.values()))
    names = []
    for s in summaries.values():
        names += [m for m in s.metric_names() if m not in names]
    head = "| metric | pre | " + " | ".join(summaries) + " |"
    lines = ["Same process, same records, same unedited model:", "", head,
             "| --- | ---: | " + " | ".join("---:" for _ in summaries) + " |"]  # fmt: skip
    for m in names:
        scale, digits = table_format(m)
        pre = first.pre.get(m)
        posts = [s.post.get(m) for s in summaries.values()]
        lines.append(f"| {m} | {pre.format(scale, digits) if pre else '-'} | "
                     + " | ".join(p.format(scale, digits) if p else "-" for p in posts) + " |")  # fmt: skip
    return "\n".join(lines)


def report(
    args: argparse.Namespace, what: str, figures: str, record: dict, suffix: str | None = None
) -> None:
    """Print what ran (with the thread count), its figures and the command; write ``record``
    (plus the command) to ``--json`` (``FILE.<suffix>.json`` when given, one per method)."""
    print(f"{what}; torch threads {torch.get_num_threads()}")
    print(figures)
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    if args.json:
        target = Path(args.json).with_suffix(f".{suffix}.json") if suffix else Path(args.json)
        target.write_text(json.dumps({**record, "command": sys.argv}, indent=1, default=str))


def time_edit(args: argparse.Namespace) -> None:
    """The time bar: all N requests written in one ``edit`` call (statistics read from the
    cache, as a user's second edit would), nothing measured."""
    from factedit import edit, load_model
    from factedit.evaluate import load_dataset
    from factedit.methods import EditContext

    path = Path(args.data) if Path(args.data).is_file() else data_path(args.data)
    t_all = time.perf_counter()
    model, tok = load_model()
    requests = [c.request for c in load_dataset(path, limit=args.offset + args.n)[args.offset :]]
    hparams = json.loads(args.hparams) if args.hparams else None
    t0 = time.perf_counter()
    result = edit(
        model,
        tok,
        requests,
        method=args.method,
        hparams=hparams,
        context=EditContext(progress=True),
    )
    seconds = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    result.restore()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items() if k != "total")
    report(args, f"{args.method}: {len(requests)} edits of {path.name}[{args.offset}:{args.offset + len(requests)}] "
                 "in one call",
           f"editing {seconds:.0f} s ({seconds / len(requests):.2f} s per fact; {phases}); all-in {total:.0f} s "
           f"incl. model load; peak RSS {peak_gb:.2f} GB",
           {"edit_seconds": seconds, "per_fact": seconds / len(requests), "timings": result.timings,
            "all_in_seconds": total, "peak_rss_gb": peak_gb})  # fmt: skip


if __name__ == "__main__":
    main()
