"""Choose MEMIT's (or AlphaEdit's, EMMET's) update hyperparameters at a large batch, cheaply.

The values (δ for every request: nearly all of an edit's cost) depend only on the model, the
requests and the top layer, not on λ, α or the lower layers of the range. This script optimises
them once, then for each setting writes the batch (keys and updates only), measures every case
(ES/PS/NS and margins, no generations) and restores the weights bit-for-bit before the next.

    python bench/memit_sweep.py --n 500 --offset 2000 --data counterfact-train.json \
        --set '{"mom2_update_weight": 500}' --set '{"mom2_update_weight": 150}' \
        --set '{"mom2_update_weight": 150, "layers": [2, 3, 4, 5, 6, 7, 8]}'

Every setting must keep the top layer of the base hyperparameters (``--hparams``). Pick
settings on records you will not report on (the reports use the first 1,000 records of
``counterfact-train.json``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from bench_mass_editing import data_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="memit", choices=["memit", "alphaedit", "emmet"])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--offset", type=int, default=2000)
    ap.add_argument("--data", default="counterfact-train.json")
    ap.add_argument("--hparams", default=None, help="inline JSON: base overrides (the values use these)")
    ap.add_argument("--set", action="append", default=[], help="inline JSON overrides of one setting (repeat)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the summaries here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from factedit import load_model
    from factedit.arch import describe
    from factedit.evaluate import load_dataset, make_config
    from factedit.evaluate.runner import _append, _json_id, measure_case, read_results, summarize
    from factedit.methods import EditContext, get_method, resolve_hparams
    from factedit.methods.base import PhaseTimer, WeightEditor
    from factedit.methods.memit import base_stats, compute_targets, probe
    from factedit.methods.rome import context_templates

    path = Path(args.data) if Path(args.data).is_file() else data_path(args.data)
    model, tok = load_model()
    arch = describe(model)
    cases = load_dataset(path, limit=args.offset + args.n)[args.offset :]
    requests = [c.request for c in cases]
    method = get_method(args.method)
    base = json.loads(args.hparams) if args.hparams else {}
    hp = resolve_hparams(method, model, base, arch)
    cfg = make_config(model, method=args.method, hparams=base or None, model_name="smollm2-135m", dataset=path,
                      kind="counterfact", generation=False)  # fmt: skip
    context = EditContext(progress=False)
    timings: dict[str, float] = {}
    timer = PhaseTimer(timings)

    t0 = time.perf_counter()
    pres = {_json_id(c.case_id): measure_case(model, tok, c, cfg, generation=False) for c in cases}
    t_pre = time.perf_counter() - t0
    templates = context_templates(model, tok, hp, context)
    with timer("value"):
        _, old_first = probe(model, tok, requests)
        _, z = compute_targets(model, tok, requests, hp, arch, templates, old_first, progress=True)
    rows = []
    tmp = tempfile.TemporaryDirectory()
    for k, setting in enumerate([json.loads(s) for s in args.set] or [{}]):
        shp = resolve_hparams(method, model, {**base, **setting}, arch)
        method.check(shp, arch)
        if shp.layers[-1] != hp.layers[-1]:
            raise SystemExit(f"setting {setting} changes the top layer ({shp.layers[-1]} vs {hp.layers[-1]})")
        ctx = EditContext(progress=False)  # a fresh context: AlphaEdit keeps no earlier keys
        mom2 = base_stats(model, tok, shp.layers, arch, ctx, shp.mom2_tokens)
        editor = WeightEditor(model)
        t1 = time.perf_counter()
        try:
            method.prepare(model, tok, shp, arch, ctx, mom2)
            method.spread(model, tok, requests, z, shp, arch, ctx, editor, mom2, templates, timer)
            t_write = time.perf_counter() - t1
            out = Path(tmp.name) / f"s{k}.jsonl"
            _append(out, {"type": "header", "config": cfg.to_dict(), "notes": [json.dumps(setting)]})
            for c in cases:
                pre = pres[_json_id(c.case_id)]
                post = measure_case(model, tok, c, cfg, pre=pre, generation=False)
                _append(out, {"type": "case", "case_id": c.case_id, "pre": pre.metrics, "post": post.metrics,
                              "seconds": {"edit": 0.0},
                              "pre_neighborhood_argmax": [list(a) for a in pre.neighborhood.true_argmax]})  # fmt: skip
        finally:
            editor.restore()
        summary = summarize(read_results(out), [c.case_id for c in cases])
        post = {m: summary.post[m].mean for m in ("ES", "PS", "NS", "EM", "PM", "ES-acc", "PS-acc") if m in summary.post}
        pre_ns = summary.pre["NS"].mean
        rows.append({"setting": setting, "pre_NS": pre_ns, **post, "write_s": t_write})
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{args.method} sweep: {len(cases)} edits of {path.name}[{args.offset}:{args.offset + len(cases)}] in one "
          f"batch; values once in {timings['value']:.0f} s; pre-edit measures {t_pre:.0f} s; torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    print("| setting | ES | PS | NS (pre " + f"{100 * rows[0]['pre_NS']:.1f}) | EM | PM |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| `{json.dumps(r['setting'])}` | " + " | ".join(f"{100 * r[m]:.1f}" for m in ("ES", "PS", "NS", "EM", "PM")) + " |")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
