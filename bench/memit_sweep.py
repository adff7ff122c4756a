"""Choose MEMIT's (or AlphaEdit's, EMMET's) update hyperparameters at a large batch, cheaply.

The values (δ for every request: nearly all of an edit's cost) depend only on the model, the
requests, the top layer and the value-stage fields (``VALUE_FIELDS``: clamp, KL weight, early
stop, context templates, ...), not on λ, α or the lower layers of the range. This script
optimises them once per distinct value stage (settings that leave those fields alone share the
base values), then for each setting writes the batch (keys and updates only), measures every
case (ES/PS/NS and margins, no generations) and restores the weights bit-for-bit before the next.

    python bench/memit_sweep.py --n 500 --offset 2000 --data counterfact-train.json \
        --set '{"mom2_update_weight": 500}' --set '{"mom2_update_weight": 150}' \
        --set '{"mom2_update_weight": 150, "layers": [2, 3, 4, 5, 6, 7, 8]}'

Every setting must keep the top layer of the base hyperparameters (``--hparams``). Pick
settings on records you will not report on (the reports use the first 1,000 records of
``counterfact-train.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from bench_mass_editing import data_path  # noqa: E402

METRICS = ("ES", "PS", "NS", "EM", "PM", "ES-acc", "PS-acc")


# The hyperparameters the values (δ and z) depend on; every other field acts on the writes.
VALUE_FIELDS = frozenset({
    "v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "kl_prompts",
    "early_stop_loss", "value_dtype", "replay_lower_layers", "value_margin", "value_batch_size",
    "context_templates", "template_seed", "repeat_factor",
})  # fmt: skip


def value_fields(setting: dict) -> dict:
    """The part of a setting that changes the values (see ``VALUE_FIELDS``)."""
    return {k: v for k, v in setting.items() if k in VALUE_FIELDS}


def cached_values(
    folder: str | None,
    model: Any,
    tok: Any,
    requests: list,
    hp: Any,
    arch: Any,
    templates: list[str],
) -> torch.Tensor:
    """The target hidden states z of ``requests`` (MEMIT's value stage), read from ``folder``
    when a file there was computed from the same weights, requests, templates and base
    hyperparameters, else computed (and written there when ``folder`` is given)."""
    from safetensors.torch import load_file, save_file

    from factedit.fingerprint import module_params_fingerprint
    from factedit.methods.memit import compute_targets, probe
    from factedit.models import model_device

    def compute() -> torch.Tensor:
        _, old_first = probe(model, tok, requests)
        _, z = compute_targets(model, tok, requests, hp, arch, templates, old_first, progress=True)
        return z

    if folder is None:
        return compute()
    # retry_rounds acts after the values (and is newer than the caches written so far).
    hp_key = {k: v for k, v in hp.to_dict().items() if k != "retry_rounds"}
    parts = [
        module_params_fingerprint(model, [""]),
        hp_key,
        templates,
        [r.to_dict() for r in requests],
    ]
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = Path(folder) / f"values-{key}.safetensors"
    if path.is_file():
        return load_file(path)["z"].to(model_device(model))
    z = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"z": z.detach().cpu().contiguous()}, str(path))
    return z


def paired_change(before: list[float], after: list[float]) -> str:
    """The mean relative change from ``before`` to ``after`` (same cases, same order) with the
    standard error of the paired differences, both in percent of the mean before."""
    from factedit.evaluate.metrics import relative_change

    rel = relative_change(before, after)
    se = rel.ci95 / 1.96  # the 95 % half-width is 1.96 standard errors
    return f"{100 * rel.mean:+.1f} % ± {100 * se:.1f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="memit", choices=["memit", "alphaedit", "emmet"])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--offset", type=int, default=2000)
    ap.add_argument("--data", default="counterfact-train.json")
    ap.add_argument(
        "--hparams", default=None, help="inline JSON: base overrides (the values use these)"
    )
    ap.add_argument(
        "--set", action="append", default=[], help="inline JSON overrides of one setting (repeat)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--gen-sample",
        type=int,
        default=0,
        help="also measure fluency (GE) on the generation prompts of the first K cases",
    )
    ap.add_argument(
        "--gen-unedited",
        type=int,
        default=0,
        help="also measure GE on the generation prompts of K cases after the batch (not edited): "
        "tells fluency lost on the edited subjects from fluency lost everywhere",
    )
    ap.add_argument(
        "--measure",
        type=int,
        default=0,
        help="measure only the first K of the N edited cases (all N are written); 0: all",
    )
    ap.add_argument(
        "--rounds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        help="e.g. 2,3: write each setting one spreading round at a time, measure after these",
    )
    ap.add_argument(
        "--final-only",
        action="store_true",
        help="with retry rounds, measure each setting only after its last retry (saves a "
        "measurement and a GE sample per retry)",
    )
    ap.add_argument("--json", default=None, help="write the summaries here (with per-case GE)")
    ap.add_argument(
        "--gen-batch-rows",
        type=int,
        default=128,
        help="sample the GE texts of several cases in one batch of up to this many rows, each case from its own "
        "seed (0: one case per call, as runs before stop 41 did)",
    )
    ap.add_argument(
        "--cache",
        default=None,
        help="folder for the optimised values, keyed on the weights, requests, templates and "
        "base hyperparameters: a second sweep of the same batch skips the value optimisation",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from factedit import load_model
    from factedit.arch import describe
    from factedit.evaluate import generation_entropy, load_dataset, make_config
    from factedit.evaluate.batch import _record
    from factedit.evaluate.metrics import mean_ci
    from factedit.evaluate.results import append_line, json_id, read_results, summarize
    from factedit.evaluate.runner import case_generations, many_case_generations, measure_case
    from factedit.methods import EditContext, get_method, resolve_hparams
    from factedit.methods.base import PhaseTimer, WeightEditor
    from factedit.methods.memit import base_stats
    from factedit.methods.rome import context_templates

    path = Path(args.data) if Path(args.data).is_file() else data_path(args.data)
    model, tok = load_model()
    arch = describe(model)
    loaded = load_dataset(path, limit=args.offset + args.n + 2 * args.gen_unedited)
    cases = loaded[args.offset : args.offset + args.n]
    bystanders = [c for c in loaded[args.offset + args.n :] if c.generation_prompts]
    bystanders = bystanders[: args.gen_unedited]
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
    measured = cases[: args.measure] if args.measure else cases
    pres = {
        json_id(c.case_id): measure_case(model, tok, c, cfg, generation=False) for c in measured
    }
    # From all edited cases, not only the measured ones: --measure limits the ES/PS/NS cases.
    gen_cases = [c for c in cases if c.generation_prompts][: args.gen_sample]
    no_edit_seconds = dict.fromkeys(
        pres, 0.0
    )  # the values and writes are timed per setting instead

    def fluency(sample: list = gen_cases) -> list[float]:
        """GE of each case of a generation sample (seeded per case, so settings differ only by
        the edit, and two settings' lists pair case by case)."""
        if args.gen_batch_rows > 0:
            gens = many_case_generations(model, tok, sample, cfg, batch_rows=args.gen_batch_rows)
        else:
            gens = [case_generations(model, tok, c, cfg) for c in sample]
        return [generation_entropy(g.texts) for g in gens]

    def mean(xs: list[float]) -> float:
        return mean_ci(xs).mean  # NaN for an empty sample

    pre_ge_cases = fluency()
    pre_ge_unedited_cases = fluency(bystanders)
    pre_ge, pre_ge_unedited = mean(pre_ge_cases), mean(pre_ge_unedited_cases)
    t_pre = time.perf_counter() - t0
    from factedit.methods.memit import Write, probe

    _, old_first = probe(model, tok, requests)  # for retry rounds: the tokens to beat
    rows = []
    tmp = tempfile.TemporaryDirectory()

    def measure(setting: dict, tag: str) -> dict:
        out = Path(tmp.name) / f"{tag}.jsonl"
        append_line(
            out, {"type": "header", "config": cfg.to_dict(), "notes": [json.dumps(setting)]}
        )
        for c in measured:
            post = measure_case(model, tok, c, cfg, pre=pres[json_id(c.case_id)], generation=False)
            append_line(out, _record(c, pres, post, no_edit_seconds, {}))
        summary = summarize(read_results(out), [c.case_id for c in measured])
        post = {m: summary.post[m].mean for m in METRICS if m in summary.post}
        ge_cases = fluency()
        row = {"pre_NS": summary.pre["NS"].mean, **post, "pre_GE": pre_ge, "GE": mean(ge_cases),
               "GE_cases": ge_cases, "pre_GE_cases": pre_ge_cases}  # fmt: skip
        if bystanders:
            unedited = fluency(bystanders)
            row |= {"pre_GE_unedited": pre_ge_unedited, "GE_unedited": mean(unedited),
                    "GE_unedited_cases": unedited, "pre_GE_unedited_cases": pre_ge_unedited_cases}  # fmt: skip
        return row

    def brief(row: dict) -> dict:
        return {k: v for k, v in row.items() if not k.endswith("_cases")}

    values: dict[str, Any] = {}  # value-stage fields (JSON) -> (templates, z)
    for k, setting in enumerate([json.loads(s) for s in args.set] or [{}]):
        shp = resolve_hparams(method, model, {**base, **setting}, arch)
        method.check(shp, arch)
        if shp.layers[-1] != hp.layers[-1]:
            raise SystemExit(
                f"setting {setting} changes the top layer ({shp.layers[-1]} vs {hp.layers[-1]})"
            )
        # Round r + 1 of a spread is a one-round spread on the model the first r rounds left
        # (the residual is recomputed there), so one write measures several round counts.
        # Retry rounds come after the last one (``method.execute``'s order).
        upto = sorted(args.rounds) if args.rounds else [shp.spread_rounds]
        # With retries and no --rounds, only the rows after retries are measured.
        measured_rounds = upto if args.rounds or not shp.retry_rounds else []
        # The values depend only on the value-stage fields: settings that leave those alone
        # share the base values (and their cache file); the others get their own.
        # Kept for the run too, so that without --cache they are not optimised again.
        vkey = json.dumps(value_fields(setting), sort_keys=True)
        if vkey not in values:
            vhp = resolve_hparams(method, model, {**base, **value_fields(setting)}, arch)
            templates = context_templates(model, tok, vhp, context)
            with timer("value"):
                z = cached_values(args.cache, model, tok, requests, vhp, arch, templates)
            values[vkey] = templates, z
        templates, z = values[vkey]  # the retries write with the templates of their values
        ctx = EditContext(progress=False)  # a fresh context: AlphaEdit keeps no earlier keys
        mom2 = base_stats(model, tok, shp.layers, arch, ctx, shp.mom2_tokens)
        editor = WeightEditor(model)
        w = Write(model, tok, shp, arch, ctx, editor, mom2, templates, timer)
        t_write = 0.0
        try:
            method.prepare(model, tok, shp, arch, ctx, mom2)
            for r in range(1, upto[-1] + 1):
                t1 = time.perf_counter()
                w.keys = method.spread(w, requests, z, 1).keys
                t_write += time.perf_counter() - t1
                if r in measured_rounds:
                    shown = {**setting, "spread_rounds": r} if args.rounds else setting
                    rows.append(
                        {"setting": shown, **measure(shown, f"s{k}r{r}"), "write_s": t_write}
                    )
                    print(json.dumps(brief(rows[-1])), flush=True)
            # Retry rounds (``retry_rounds`` in a setting) after the last spreading round,
            # measured after each one; the row above is the same write without them.
            failed: list[int] | None = None
            for t in range(1, shp.retry_rounds + 1):
                t1 = time.perf_counter()
                failed = method.retry(w, requests, old_first, among=failed)
                t_write += time.perf_counter() - t1
                if args.final_only and failed and t < shp.retry_rounds:
                    continue
                shown = {**setting, "spread_rounds": upto[-1], "retry_rounds": t}
                rows.append(
                    {
                        "setting": shown,
                        **measure(shown, f"s{k}t{t}"),
                        "write_s": t_write,
                        "retried": len(failed),
                    }  # fmt: skip
                )
                print(json.dumps(brief(rows[-1])), flush=True)
                if not failed:
                    break
        finally:
            editor.restore()
    print()
    print(f"{args.method} sweep: {len(cases)} edits of {path.name}[{args.offset}:{args.offset + len(cases)}] in one "
          f"batch ({len(measured)} measured); values in {timings['value']:.0f} s; pre-edit measures "
          f"{t_pre:.0f} s; torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    ge_head = f" GE (pre {pre_ge:.2f}, {len(gen_cases)} cases) |" if gen_cases else ""
    if bystanders:
        ge_head += f" GE of {len(bystanders)} unedited cases (pre {pre_ge_unedited:.2f}) |"
    print(
        "| setting | ES | PS | NS (pre " + f"{100 * rows[0]['pre_NS']:.1f}) | EM | PM |" + ge_head
    )
    print(
        "| --- | ---: | ---: | ---: | ---: | ---: |"
        + " ---: |" * (bool(gen_cases) + bool(bystanders))
    )
    for r in rows:
        ge_cell = f" {r['GE']:.2f} |" if gen_cases else ""
        if bystanders:
            ge_cell += f" {r['GE_unedited']:.2f} |"
        print(
            f"| `{json.dumps(r['setting'])}` | "
            + " | ".join(f"{100 * r[m]:.1f}" for m in ("ES", "PS", "NS", "EM", "PM"))
            + " |"
            + ge_cell
        )
    if gen_cases:
        # Each case's texts are seeded by its id, so the change is paired case by case; its
        # standard error is what a difference between two rows must beat.
        print("GE change against the unedited model, paired over the same cases (mean ± SE):")
        for r in rows:
            line = (
                f"- `{json.dumps(r['setting'])}`: {paired_change(r['pre_GE_cases'], r['GE_cases'])}"
            )
            if bystanders:
                line += f"; unedited cases {paired_change(r['pre_GE_unedited_cases'], r['GE_unedited_cases'])}"
            print(line)
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
