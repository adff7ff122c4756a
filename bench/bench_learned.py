"""Learned editors (MEND, KE): training time per variant and edit time with a trained editor.

Training (``--train``) runs :func:`factedit.learned.train_editor` and prints its seconds, the
seconds per step and the validation curve; by default into a fresh temporary cache so the
figure is a real training time (``--cache`` reuses/fills a cache instead). Editing (default)
edits the first ``--n`` dev CounterFact records one at a time with the trained editor (restored
between edits) and prints the median seconds per edit, its phases, and P(new) before/after.

Examples::

    OMP_NUM_THREADS=1 python bench/bench_learned.py --train --method mend --variant cf --steps 100
    OMP_NUM_THREADS=1 python bench/bench_learned.py --method mend-cf --n 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from factedit import edit, load_model
from factedit.learned import train_editor
from factedit.methods import EditContext
from factedit.requests import EditRequest

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    env = os.environ.get("FACTEDIT_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


TRAIN_DATA = {
    "cf": lambda: data_dir() / "counterfact" / "counterfact-train.json",
    "zsre": lambda: data_dir() / "zsre" / "zsre_extra_2500.json",
    "gen": lambda: None,
}


def bench_train(args: argparse.Namespace, model, tok) -> None:
    cache = args.cache or tempfile.mkdtemp(prefix="factedit-bench-")
    t0 = time.perf_counter()
    res = train_editor(model, tok, args.method.split("-")[0], args.variant, TRAIN_DATA[args.variant](),
                       steps=args.steps, cache_dir=cache, progress=not args.quiet)  # fmt: skip
    wall = time.perf_counter() - t0
    h = res.header
    print(f"{args.method}-{args.variant}: {wall:.1f} s wall ({'cached' if res.from_cache else 'trained'}), "
          f"{h['steps_done']} steps, {h['seconds'] / max(h['steps_done'], 1):.2f} s/step incl. validation; "
          f"best at step {h['best_step']}, stopped early: {h['stopped_early']}")  # fmt: skip
    print("step  train_loss  edit_acc  rephrase_acc  locality")
    for c in h["curve"]:
        tl = "-" if c["train_loss"] is None else f"{c['train_loss']:.3f}"
        print(
            f"{c['step']:>5}  {tl:>10}  {c['edit_acc']:8.3f}  {c['rephrase_acc']:12.3f}  {c['locality']:8.3f}"
        )
    print(f"editor: {res.path}")


def bench_edit(args: argparse.Namespace, model, tok) -> None:
    records = json.loads((data_dir() / "counterfact" / "counterfact_dev.json").read_text())[
        : args.n + 1
    ]
    # One context for all edits, as the evaluation runner and an EditSession hold one: the
    # editor file is read once (the first edit, a warm-up outside the timed ones).
    ctx = EditContext(progress=False)
    edit(model, tok, EditRequest.from_any(records[0]), method=args.method, context=ctx).restore()
    times, phases, probs = [], {}, []
    for rec in records[1:]:
        req = EditRequest.from_any(rec)
        r = edit(model, tok, req, method=args.method, context=ctx)
        times.append(r.timings["total"])
        for k, v in r.timings.items():
            phases.setdefault(k, []).append(v)
        probs.append(
            (r.diagnostics[0]["target_prob_before"], r.diagnostics[0]["target_prob_after"])
        )
        r.restore()
    print(f"{args.method}: median {statistics.median(times):.3f} s per edit over {len(times)} edits "
          f"(mean {statistics.mean(times):.3f}); phases (median): "
          + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in phases.items() if k != "total"))  # fmt: skip
    print(
        f"median P(new) before {statistics.median(p for p, _ in probs):.4f}, after {statistics.median(q for _, q in probs):.4f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train", action="store_true", help="measure training instead of editing")
    p.add_argument(
        "--method", default="mend-cf", help="edit: mend-cf, ke-cf, ...; train: mend or ke"
    )
    p.add_argument(
        "--variant", default="cf", choices=["cf", "zsre", "gen"], help="training variant"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps (default: shipped config)"
    )
    p.add_argument(
        "--cache", default=None, help="cache folder for --train (default: a fresh temporary one)"
    )
    p.add_argument("--n", type=int, default=10, help="edits to time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"command: python {' '.join(sys.argv)}  (threads: {torch.get_num_threads()})")
    model, tok = load_model()
    if args.train:
        bench_train(args, model, tok)
    else:
        bench_edit(args, model, tok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
