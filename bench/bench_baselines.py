"""Measure the baseline editors (FT, FT-L, FT-AttnEdit, KN; ROME when available) on CounterFact.

For each of the first ``--n`` records of a CounterFact file (ROME's record format), edit a
freshly restored model, then score with teacher forcing (mean per-token log-probability):

* ES (efficacy): P(new) > P(true) on the rewrite prompt;
* PS (paraphrase): the same on the paraphrase prompts;
* NS (neighbourhood specificity): P(true) > P(new) on the neighbourhood prompts;
* p_new: the new target's probability on the rewrite prompt (geometric mean per token).

Pre-edit numbers are the same metrics on the unedited model. This is the small measurement
used to choose the shipped defaults (see docs/baselines.md); the full CounterFact table comes
from the evaluation runner.

Examples::

    OMP_NUM_THREADS=1 python bench/bench_baselines.py --n 20 --methods ft ft-l ft-attnedit kn
    python bench/bench_baselines.py --n 20 --methods ft-l --hparams '{"norm_constraint": 2e-3}'
    python bench/bench_baselines.py --data path/to/counterfact_dev.json --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from factedit import edit, load_model
from factedit.requests import EditRequest
from factedit.scoring import mean_target_logprob

REPO = Path(__file__).resolve().parents[1]


def default_data() -> Path:
    env = os.environ.get("FACTEDIT_DATA_DIR")
    base = Path(env) if env else REPO.parent / "shared" / "data"
    return base / "counterfact" / "counterfact_dev.json"


def score_record(model, tok, record: dict) -> dict[str, float]:
    """ES/PS/NS indicators and p_new for one CounterFact record on the current model."""
    rr = record["requested_rewrite"]
    rewrite = rr["prompt"].format(rr["subject"])
    new, true = " " + rr["target_new"]["str"], " " + rr["target_true"]["str"]
    groups = {
        "ES": [rewrite],
        "PS": list(record["paraphrase_prompts"]),
        "NS": list(record["neighborhood_prompts"]),
    }
    prompts = [p for ps in groups.values() for p in ps]
    lp = mean_target_logprob(model, tok, prompts * 2, [new] * len(prompts) + [true] * len(prompts))
    lp_new, lp_true = lp[: len(prompts)], lp[len(prompts) :]
    out, s = {}, 0
    for key, ps in groups.items():
        n, t = lp_new[s : s + len(ps)], lp_true[s : s + len(ps)]
        wins = (t > n) if key == "NS" else (n > t)
        out[key] = float(wins.float().mean())
        s += len(ps)
    out["p_new"] = float(lp_new[0].exp())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data", type=Path, default=None, help="CounterFact JSON (ROME's record format)"
    )
    ap.add_argument("--n", type=int, default=20, help="number of records from the start")
    ap.add_argument("--methods", nargs="+", default=["ft", "ft-l", "ft-attnedit", "kn"])
    ap.add_argument("--hparams", default=None, help="JSON overrides applied to every method")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=None, help="append per-record JSON lines here")
    args = ap.parse_args(argv)

    records = json.loads((args.data or default_data()).read_text())[: args.n]
    model, tok = load_model(args.model)
    overrides = json.loads(args.hparams) if args.hparams else None
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pre = [score_record(model, tok, r) for r in records]
    print(
        f"pre  ES {mean(pre, 'ES'):.3f} PS {mean(pre, 'PS'):.3f} NS {mean(pre, 'NS'):.3f} p_new {mean(pre, 'p_new'):.4f}"
    )
    for method in args.methods:
        post, secs = [], []
        for rec in records:
            t0 = time.perf_counter()
            result = edit(model, tok, EditRequest.from_any(rec), method=method, hparams=overrides)
            secs.append(time.perf_counter() - t0)
            scores = score_record(model, tok, rec)
            result.restore()
            post.append(scores)
            if args.out:
                with args.out.open("a") as f:
                    row = {
                        "method": method,
                        "case_id": rec["case_id"],
                        "hparams": result.hparams.to_dict(),
                        "seconds": secs[-1],
                        **scores,
                    }
                    f.write(json.dumps(row) + "\n")
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, pristine[k])]
        assert not changed, f"{method} did not restore {changed[:3]}"
        print(
            f"{method:<12} ES {mean(post, 'ES'):.3f} PS {mean(post, 'PS'):.3f} NS {mean(post, 'NS'):.3f} "
            f"p_new {mean(post, 'p_new'):.4f}  s/edit {statistics.median(secs):.2f} (median)  "
            f"hparams {json.dumps(result.hparams.to_dict())}",
            flush=True,
        )
    return 0


def mean(rows: list[dict[str, float]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


if __name__ == "__main__":
    sys.exit(main())
