"""Quick ROME sweeps on early CounterFact dev records: ES/PS/NS and seconds per edit.

Each case is edited on the unchanged model and restored afterwards. For the full metric set
use ``factedit eval``; this script is for choosing hyperparameters quickly.

    python bench/rome_sweep.py --n 20 --grid '{"layer": [3, 5, 7], "key_mode": ["mean", "each"]}'
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import factedit
from factedit.evaluate import load_dataset
from factedit.methods import EditContext
from factedit.scoring import mean_target_logprob

DATA = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "counterfact"
    / "counterfact_dev.json"
)


def case_scores(model, tok, case) -> dict[str, float]:
    r = case.request
    groups = {
        "ES": [r.text],
        "PS": list(case.paraphrase_prompts),
        "NS": list(case.neighborhood_prompts),
    }
    prompts = [p for g in groups.values() for p in g]
    new = mean_target_logprob(model, tok, prompts, [r.target_text] * len(prompts))
    true = mean_target_logprob(model, tok, prompts, [r.true_text] * len(prompts))
    out, i = {}, 0
    for name, g in groups.items():
        n, t = new[i : i + len(g)], true[i : i + len(g)]
        i += len(g)
        out[name] = float((t > n).float().mean()) if name == "NS" else float((n > t).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--grid", default="{}", help="JSON: field -> list of values")
    ap.add_argument("--hparams", default="{}", help="JSON: fixed overrides")
    ap.add_argument("--method", default="rome")
    args = ap.parse_args(argv)
    model, tok = factedit.load_model()
    cases = load_dataset(args.data, limit=args.start + args.n)[args.start :]
    grid = json.loads(args.grid)
    fixed = json.loads(args.hparams)
    keys = sorted(grid)
    pre = [case_scores(model, tok, c) for c in cases]
    print(
        f"pre  ES {statistics.mean(s['ES'] for s in pre):.3f} PS {statistics.mean(s['PS'] for s in pre):.3f} "
        f"NS {statistics.mean(s['NS'] for s in pre):.3f}  (n={len(cases)})",
        flush=True,
    )
    ctx = EditContext(progress=False)
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        hp = {**fixed, **dict(zip(keys, values, strict=True))}
        post, secs, steps = [], [], []
        for c in cases:
            t0 = time.perf_counter()
            res = factedit.edit(model, tok, c.request, method=args.method, hparams=hp, context=ctx)
            secs.append(time.perf_counter() - t0)
            steps.append(res.diagnostics[0].get("v_steps", 0))
            post.append(case_scores(model, tok, c))
            res.restore()
        m = {k: statistics.mean(s[k] for s in post) for k in ("ES", "PS", "NS")}
        print(
            f"{json.dumps(hp)}: ES {m['ES']:.3f} PS {m['PS']:.3f} NS {m['NS']:.3f} "
            f"s/edit {statistics.median(secs):.2f} (median) steps {statistics.mean(steps):.1f}",
            flush=True,
        )
    print("command: python " + " ".join(sys.argv), flush=True)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    sys.exit(main())
