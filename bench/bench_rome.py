"""Time per ROME edit on the default model, split into phases, and in machine-independent units.

The unit is one forward+backward pass of the whole model (float32) over the same prompts the
value optimisation uses (the prefixed rewrite prompts plus the KL prompt), measured in the
same process. Statistics and context templates are cached before timing starts.

    python bench/bench_rome.py --n 5
    python bench/bench_rome.py --n 5 --hparams '{"value_dtype": null}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import factedit
from factedit.evaluate import load_dataset
from factedit.methods import EditContext
from factedit.methods.rome import ROMEHParams, context_templates
from factedit.tokens import prompt_target_batch

DATA = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "counterfact"
    / "counterfact_dev.json"
)


def fwd_bwd_seconds(
    model, tok, request, hp: ROMEHParams, templates: list[str], repeats: int = 3
) -> float:
    texts = [t.replace("{}", request.text) for t in templates]
    prompts = texts + [p.replace("{}", request.subject) for p in hp.kl_prompts]
    targets = [request.target_text] * len(texts) + [" a"] * len(hp.kl_prompts)
    b = prompt_target_batch(tok, prompts, targets)
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        out.logits.float().logsumexp(-1).mean().backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5, help="CounterFact dev records to edit")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N records")
    ap.add_argument("--hparams", default="{}", help="JSON overrides of the shipped defaults")
    args = ap.parse_args(argv)
    model, tok = factedit.load_model()
    overrides = json.loads(args.hparams)
    hp = ROMEHParams.defaults_for("rome", model).replace(**overrides)
    ctx = EditContext(progress=False)
    cases = load_dataset(args.data, limit=args.skip + args.n)[args.skip :]
    # Warm the caches (statistics, templates) outside the timed region.
    factedit.edit(model, tok, cases[0].request, hparams=hp.to_dict(), context=ctx).restore()
    templates = context_templates(model, tok, hp, ctx)
    unit = fwd_bwd_seconds(model, tok, cases[0].request, hp, templates)
    rows = []
    for c in cases:
        res = factedit.edit(model, tok, c.request, hparams=hp.to_dict(), context=ctx)
        res.restore()
        rows.append({**res.timings, "steps": res.diagnostics[0]["v_steps"],
                     "retries": res.diagnostics[0].get("efficacy_retries", 0)})  # fmt: skip
    phases = ["key", "value", "update", "probe", "stats", "templates", "total"]
    med = {p: statistics.median(r.get(p, 0.0) for r in rows) for p in phases}
    print(
        f"ROME on the default model, {len(rows)} CounterFact edits, threads={torch.get_num_threads()}"
    )
    print(
        f"hparams: layer {hp.layer}, {len(templates)} prompts, value_dtype {hp.value_dtype}, "
        f"max steps {hp.v_num_grad_steps}; mean steps taken {statistics.mean(r['steps'] for r in rows):.1f}"
    )
    print("median seconds per edit: " + ", ".join(f"{p} {med[p]:.2f}" for p in phases))
    print(
        f"one forward+backward of the full model over the same {len(templates) + len(hp.kl_prompts)} prompts: {unit:.3f} s"
    )
    mean_total = statistics.mean(r["total"] for r in rows)
    retried = sum(r["retries"] > 0 for r in rows)
    print(
        f"time per edit = {med['total'] / unit:.1f} forward+backward passes "
        f"(value optimisation {med['value'] / unit:.1f}); mean {mean_total:.2f} s = "
        f"{mean_total / unit:.2f} passes, {retried} of {len(rows)} edits retried by the efficacy check"
    )
    print("command: python " + " ".join(["bench/bench_rome.py", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
