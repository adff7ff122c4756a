"""The hard slice: CounterFact facts the default model knows strongly, for checking that edits
hold where the old answer resists most.

A record is in the slice when the model's own top-1 next token after the request prompt is the
first token of the true target, with probability > ``--min-p`` (0.5). The slice is written in
the input file's layout, so ``factedit eval`` runs on it directly:

    python bench/hard_slice.py --data ../shared/data/counterfact/counterfact-val.json \
        ../shared/data/counterfact/counterfact-train.json --out hard.json
    factedit eval --method rome --data counterfact hard.json --no-generation --limit 100

Records are read from the file given (the flat EasyEdit layout or ROME's own); nothing is
tuned on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import factedit
from factedit.evaluate import load_dataset
from factedit.scoring import target_token_scores

DATA = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "counterfact"
    / "counterfact-val.json"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[DATA],
        help="CounterFact file(s), all in one layout",
    )
    ap.add_argument("--out", type=Path, required=True, help="where to write the slice (JSON list)")
    ap.add_argument(
        "--min-p", type=float, default=0.5, help="P(true target's first token) above this"
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = factedit.load_model()
    raw, cases = [], []
    for path in args.data:
        records = json.loads(path.read_text())
        loaded = load_dataset(path)
        if len(records) != len(loaded):
            raise SystemExit(
                f"the loader skipped records of {path}; cannot map the slice back to the file"
            )
        raw += records
        cases += loaded
    prompts = [c.request.text for c in cases]
    trues = [c.request.true_text for c in cases]
    scores = target_token_scores(model, tok, prompts, trues, batch_size=64)
    keep = [
        i
        for i, s in enumerate(scores)
        if bool(s.correct[0]) and float(s.logprobs[0].exp()) > args.min_p
    ]
    args.out.write_text(json.dumps([raw[i] for i in keep], indent=1))
    print(
        f"{len(keep)} of {len(cases)} records: the model's top-1 is the true target's first token "
        f"with p > {args.min_p} (threads={args.threads})"
    )
    print(f"wrote {args.out}")
    print("command: python " + " ".join(["bench/hard_slice.py", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
