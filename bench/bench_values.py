"""The value optimisation alone: seconds for a fixed number of steps of one request, with and
without the prefix key/value cache, in float32 and under bfloat16 autocast, all in one process
so the four figures are comparable.

    python bench/bench_values.py --steps 6 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import factedit
from factedit.evaluate import load_dataset
from factedit.methods import EditContext
from factedit.methods.rome import ROMEHParams, context_templates
from factedit.values import ValueConfig, optimize_values

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact_dev.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = factedit.load_model()
    arch = factedit.describe(model)
    hp = ROMEHParams.defaults_for("rome", model, arch)
    templates = context_templates(model, tok, hp, EditContext(progress=False))
    request = load_dataset(args.data, limit=1)[0].request
    rows = []
    for _ in range(args.repeats):
        for dtype in ("bfloat16", None):
            for prefix in (True, False):
                # No early stop, no margin: every setting runs exactly --steps steps.
                cfg = ValueConfig.from_hparams(
                    hp, steps=args.steps, early_stop_loss=0.0, margin=None, dtype=dtype, prefix_cache=prefix
                )
                t0 = time.perf_counter()
                optimize_values(model, tok, [request], arch, hp.layer, templates, cfg)
                rows.append((dtype or "float32", prefix, time.perf_counter() - t0))
    print(f"value optimisation, {args.steps} steps of one request, {len(templates)} prompts + KL, "
          f"threads={args.threads}")
    for dtype in ("bfloat16", "float32"):
        for prefix in (True, False):
            secs = [s for d, p, s in rows if d == dtype and p == prefix]
            print(f"  {dtype:<9} prefix cache {'on ' if prefix else 'off'}: "
                  + ", ".join(f"{s:.2f} s" for s in secs))
    print("command: python " + " ".join(["bench/bench_values.py", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
