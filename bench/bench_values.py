"""The value optimisation alone: seconds for a fixed number of steps of one request, with and
without the prefix key/value cache, in float32 and under bfloat16 autocast, all in one process
so the four figures are comparable.

    python bench/bench_values.py --steps 6 --threads 1

With ``--batch-sizes`` it times MEMIT's value stage instead (the shipped hyperparameters, early
stop included) on ``--n`` flat CounterFact records for each ``value_batch_size``, in one process,
and how far the δ move with the chunking (padding changes the bfloat16 rounding, and a request
that crosses the early stop one step earlier or later ends one Adam step apart):

    python bench/bench_values.py --batch-sizes 8,16,32,64 --n 64 --offset 3000 --threads 2
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

DATA = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "counterfact"
    / "counterfact_dev.json"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument(
        "--batch-sizes", default=None, help="comma-separated MEMIT value_batch_size values to time"
    )
    ap.add_argument("--n", type=int, default=64, help="with --batch-sizes: requests")
    ap.add_argument("--offset", type=int, default=3000, help="with --batch-sizes: first record")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.batch_sizes:
        return value_batches(args)
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
                    hp,
                    steps=args.steps,
                    early_stop_loss=0.0,
                    margin=None,
                    dtype=dtype,
                    prefix_cache=prefix,
                )
                t0 = time.perf_counter()
                optimize_values(model, tok, [request], arch, hp.layer, templates, cfg)
                rows.append((dtype or "float32", prefix, time.perf_counter() - t0))
    print(
        f"value optimisation, {args.steps} steps of one request, {len(templates)} prompts + KL, "
        f"threads={args.threads}"
    )
    for dtype in ("bfloat16", "float32"):
        for prefix in (True, False):
            secs = [s for d, p, s in rows if d == dtype and p == prefix]
            print(
                f"  {dtype:<9} prefix cache {'on ' if prefix else 'off'}: "
                + ", ".join(f"{s:.2f} s" for s in secs)
            )
    print("command: python " + " ".join(["bench/bench_values.py", *sys.argv[1:]]))
    return 0


def value_batches(args: argparse.Namespace) -> int:
    """MEMIT's value stage on the same requests for each ``value_batch_size``."""
    from dataclasses import replace

    from factedit.methods import get_method, resolve_hparams
    from factedit.methods.memit import compute_targets, probe

    data = args.data if args.data != DATA else DATA.parent / "counterfact-train.json"
    model, tok = factedit.load_model()
    arch = factedit.describe(model)
    hp = resolve_hparams(get_method("memit"), model, {}, arch)
    templates = context_templates(model, tok, hp, EditContext(progress=False))
    requests = [c.request for c in load_dataset(data, limit=args.offset + args.n)[args.offset :]]
    _, old_first = probe(model, tok, requests)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    times: dict[int, list[float]] = {b: [] for b in sizes}
    deltas: dict[int, torch.Tensor] = {}
    for _ in range(args.repeats):
        for b in sizes:
            t0 = time.perf_counter()
            values, _ = compute_targets(
                model,
                tok,
                requests,
                replace(hp, value_batch_size=b),
                arch,
                templates,
                old_first,
                progress=False,
            )
            times[b].append(time.perf_counter() - t0)
            deltas[b] = torch.stack([v.delta for v in values])
            steps = sum(v.steps for v in values) / len(values)
    ref = deltas[sizes[0]]
    print(
        f"MEMIT value stage, {len(requests)} requests (records {args.offset}-{args.offset + len(requests) - 1} "
        f"of {data.name}), {len(templates)} prompts + KL, threads={args.threads}, mean steps {steps:.1f}"
    )
    for b in sizes:
        rel = (deltas[b] - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)
        diff = f"median {float(rel.median()):.1e}, max {float(rel.max()):.1e}"
        print(
            f"  value_batch_size {b:>4}: "
            + ", ".join(f"{t:.1f} s" for t in times[b])
            + f"  ({min(times[b]) / len(requests):.3f} s/request; relative δ difference vs {sizes[0]}: {diff})"
        )
    print("command: python " + " ".join(["bench/bench_values.py", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
