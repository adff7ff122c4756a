"""Time per evaluation case, with and without generation (GE/RS), on the default model.

Runs ``factedit``'s evaluation runner on the first N CounterFact dev records twice, once with
generation and once with ``--no-generation``, into throw-away results files, and prints the
mean seconds per case for each phase (edit, pre/post scoring, generation) and the equivalent
``factedit eval`` commands.

    python bench/bench_eval.py                    # ROME defaults, 3 cases
    python bench/bench_eval.py --cases 5 --hparams '{"v_num_grad_steps": 10}'
    FACTEDIT_DATA_DIR=/path/to/data python bench/bench_eval.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def data_path() -> Path:
    base = Path(os.environ.get("FACTEDIT_DATA_DIR", REPO.parent / "shared" / "data"))
    return base / "counterfact" / "counterfact_dev.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--method", default="rome")
    ap.add_argument(
        "--hparams", default=None, help="inline JSON overrides of the method's defaults"
    )
    ap.add_argument("--data", default=None, help="CounterFact file (default: the shared dev set)")
    args = ap.parse_args()

    from factedit import load_model
    from factedit.evaluate import load_dataset, make_config, run_evaluation

    path = Path(args.data) if args.data else data_path()
    hparams = json.loads(args.hparams) if args.hparams else None
    model, tok = load_model()
    cases = load_dataset(path, limit=args.cases)
    print(
        f"model smollm2-135m float32, torch threads {torch.get_num_threads()}, {len(cases)} cases of {path.name}"
    )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for generation in (False, True):
            cfg = make_config(model, method=args.method, hparams=hparams, model_name="smollm2-135m",
                              dataset=path, kind="counterfact", generation=generation)  # fmt: skip
            if generation:  # build (or load) the TF-IDF statistics outside the timed loop
                from factedit.evaluate.tfidf import load_reference_scorer

                t0 = time.perf_counter()
                scorer = load_reference_scorer()
                print(
                    f"TF-IDF statistics and reference index ready in {time.perf_counter() - t0:.1f} s"
                )
            else:
                scorer = None
            t0 = time.perf_counter()
            summary = run_evaluation(model, tok, cases, cfg, Path(tmp) / f"gen{int(generation)}.jsonl",
                                     hparams=hparams, reference_scorer=scorer, progress=False)  # fmt: skip
            wall = (time.perf_counter() - t0) / len(cases)
            rows["with generation" if generation else "no generation"] = (summary.seconds, wall)

    print(f"\n| seconds per case | {' | '.join(rows)} |")
    print("| --- |" + " ---: |" * len(rows))
    for key in ("edit", "pre_eval", "post_eval", "generation", "case"):
        cells = [secs[key].format(1.0, 2) if key in secs else "-" for secs, _ in rows.values()]
        print(f"| {key} | {' | '.join(cells)} |")
    print(f"| wall (incl. overhead) | {' | '.join(f'{w:.2f}' for _, w in rows.values())} |")
    hp = f" --hparams '{args.hparams}'" if args.hparams else ""
    print("\nequivalent commands:")
    print(
        f"  factedit eval --method {args.method} --data counterfact {path} --limit {args.cases}{hp} --no-generation"
    )
    print(
        f"  factedit eval --method {args.method} --data counterfact {path} --limit {args.cases}{hp}"
    )


if __name__ == "__main__":
    main()
