"""GE (fluency) of N CounterFact cases on the unedited default model: one case per
``generate`` call (factedit's GE until stop 41) against many cases per call, each case still
sampled from its own seed (``many_case_generations``). Prints the seconds, the texts that came
out the same, and both GE means.

    python bench/bench_ge.py --cases 100 --threads 2
    python bench/bench_ge.py --cases 100 --rows 32,64,128 --data counterfact-train.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mass_editing import data_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--data", default="counterfact-train.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="128", help="comma-separated batch_rows to time")
    ap.add_argument("--skip-single", action="store_true", help="do not time one case per call")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from factedit import load_model
    from factedit.evaluate import generation_entropy, load_dataset, make_config
    from factedit.evaluate.metrics import mean_ci
    from factedit.evaluate.runner import case_generations, many_case_generations

    path = Path(args.data) if Path(args.data).is_file() else data_path(args.data)
    model, tok = load_model()
    loaded = load_dataset(path, limit=args.offset + 4 * args.cases)
    cases = [c for c in loaded[args.offset :] if c.generation_prompts][: args.cases]
    cfg = make_config(
        model,
        method="memit",
        hparams=None,
        model_name="smollm2-135m",
        dataset=path,
        kind="counterfact",
    )
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"model smollm2-135m float32, torch threads {torch.get_num_threads()}, {len(cases)} cases of {path.name}"
    )

    def ge(gens: list) -> float:
        return mean_ci([generation_entropy(g.texts) for g in gens]).mean

    single = None
    if not args.skip_single:
        t0 = time.perf_counter()
        single = [case_generations(model, tok, c, cfg) for c in cases]
        secs = time.perf_counter() - t0
        print(
            f"one case per call: {secs:.1f} s ({secs / len(cases):.2f} s per case), GE {ge(single):.4f}"
        )
    for rows in (int(r) for r in args.rows.split(",")):
        t0 = time.perf_counter()
        many = many_case_generations(model, tok, cases, cfg, batch_rows=rows)
        secs = time.perf_counter() - t0
        line = f"batch_rows {rows}: {secs:.1f} s ({secs / len(cases):.2f} s per case), GE {ge(many):.4f}"
        if single is not None:
            texts = [
                (a, b)
                for x, y in zip(many, single, strict=True)
                for a, b in zip(x.texts, y.texts, strict=True)
            ]
            same = sum(a == b for a, b in texts)
            line += f", texts the same as one case per call: {same} of {len(texts)}"
        print(line)


if __name__ == "__main__":
    main()
