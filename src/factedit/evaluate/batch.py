"""Evaluation of mass editing, following the MEMIT/AlphaEdit protocol.

* batch (default): the cases are cut into batches of ``batch_size``; each batch is edited at once
  on the unedited model, every case of the batch is measured on the edited model, and the
  weights are restored before the next batch (MEMIT's ``--num_edits``);
* sequential: the batches are applied one after another in one
  :class:`~factedit.session.EditSession` (AlphaEdit's protocol) and every case is measured at
  the end, on the model holding all the edits. With ``gen_checkpoints`` the fluency of the
  sample is also measured after the listed batches, split into the cases edited so far and those
  not edited yet (each paired against its own value before the edits), so a run shows whether
  fluency falls with the number of writes and whether it falls for text about subjects no edit
  touched (a model-wide change) or only for the edited ones.

"pre" metrics are measured on the unedited model. Generation (GE, RS) is measured only on a
fixed sample of ``gen_sample`` cases (chosen by the run's seed), so a 1,000-edit run stays
affordable. Results go to the same JSONL layout as :func:`~factedit.evaluate.runner.run_evaluation`
(header with the configuration plus ``protocol``, ``batch_size``, ``gen_sample``; one line per
case) and summarise with the same :func:`~factedit.evaluate.results.summarize`. Batch mode
resumes at batch granularity; a sequential run is written when it completes (an interrupted one
starts again).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .datasets import EvalCase
from .metrics import GENERATION_METRICS, mean_ci
from .precache import PreEditCache, measure_before
from .results import ResultsFile, Summary, append_line, json_id, read_results, summarize
from .runner import (
    ConfigMismatchError,
    EvalConfig,
    config_differences,
    generation_metrics,
    many_case_generations,
    measure_case,
    scalar_diagnostics,
)

log = logging.getLogger(__name__)


def generation_sample(cases: Sequence[EvalCase], n: int, seed: int) -> set[Any]:
    """The case ids whose generations are measured: ``n`` cases drawn with ``seed`` (all when
    there are fewer), the same for every method and batch size on the same cases."""
    ids = [json_id(c.case_id) for c in cases]
    if n >= len(ids):
        return set(ids)
    return set(random.Random(seed).sample(ids, n))


def run_batch_evaluation(
    model: nn.Module,
    tok: Any,
    cases: Sequence[EvalCase],
    config: EvalConfig,
    out: str | Path,
    *,
    batch_size: int,
    hparams: Any = None,
    gen_sample: int = 100,
    reference_scorer: Any = None,
    progress: bool = True,
    overwrite: bool = False,
    context: Any = None,
    pre_cache: bool | str | Path = False,
    gen_batch_rows: int = 128,
    gen_checkpoints: Sequence[int] = (),
) -> Summary:
    """Evaluate ``config.method`` on ``cases`` edited ``batch_size`` at a time (see the module
    docstring; ``config.sequential`` chooses the protocol). Returns the :class:`Summary`.

    ``pre_cache``: True (or a folder) reads pre-edit measurements from a disk cache keyed on
    everything they depend on and stores the missing ones there (see
    :mod:`~factedit.evaluate.precache`; True: under factedit's cache folder). Not used with a
    caller's own ``reference_scorer``, which the key cannot name.

    ``gen_batch_rows``: generation prompts of several cases are sampled in one batch of up to
    this many rows, each case from its own seed (``many_case_generations``).

    ``gen_checkpoints`` (sequential only, needs generation): after each listed batch (1-based,
    below the last; the last is the final measurement) the sample's generations are made again
    on the model as it is and a ``checkpoint`` line records GE and GE-eos per case and, for the
    cases edited so far and those not yet edited, the mean and its change paired against
    before the edits (:func:`batch_checkpoint`). The lines are written with the cases, when the
    run completes.

    Guarantees: the model's weights are the same on return (or exception) as on entry; a results
    file with another configuration raises :class:`ConfigMismatchError` unless ``overwrite``.
    """
    from tqdm.auto import tqdm

    from ..methods import EditContext
    from ..session import EditSession

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = Path(out)
    n_batches = -(-len(cases) // batch_size)
    gen_checkpoints = sorted(set(gen_checkpoints))
    generating = config.generation and gen_sample > 0
    if gen_checkpoints:
        if not config.sequential:
            raise ValueError(
                "gen_checkpoints needs a sequential run (each batch is restored otherwise)"
            )
        if not generating:
            raise ValueError(
                "gen_checkpoints needs generations (config.generation and gen_sample > 0)"
            )
        bad = [k for k in gen_checkpoints if not 1 <= k < n_batches]
        if bad:
            raise ValueError(
                f"gen_checkpoints {bad} out of range: a run of {n_batches} batches has checkpoints 1..{n_batches - 1} "
                "(the final measurement follows the last batch)"
            )
    cfg = {
        **config.to_dict(),
        "protocol": "batch",
        "batch_size": batch_size,
        "gen_sample": gen_sample,
    }
    if gen_checkpoints:  # only when used, so that earlier results files keep their configuration
        cfg["gen_checkpoints"] = gen_checkpoints
    if out.exists() and overwrite:
        out.unlink()
    existing = ResultsFile(None, [], [])
    if out.exists() and out.stat().st_size > 0:
        existing = read_results(out, repair=True)
        if existing.config is not None and existing.config != cfg:
            raise ConfigMismatchError(out, config_differences(existing.config, cfg))
    if existing.header is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        gen_note = (
            f"GE/RS on a fixed sample of {gen_sample} cases"
            if generating
            else "no generations (GE/RS not measured)"
        )
        order = ", applied sequentially" if config.sequential else ""
        notes = [f"mass editing: batches of {batch_size}{order}; {gen_note}"]
        append_line(
            out,
            {
                "type": "header",
                "config": cfg,
                "notes": notes,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    done = {c["case_id"] for c in existing.cases}
    batches = [list(cases[s : s + batch_size]) for s in range(0, len(cases), batch_size)]
    todo = [b for b in batches if not all(json_id(c.case_id) in done for c in b)]
    if config.sequential and done and todo:
        raise ConfigMismatchError(
            out,
            [
                "sequential: the file holds part of a sequential run, which cannot be resumed batch by batch"
            ],
        )
    gen_ids = generation_sample(cases, gen_sample, config.seed) if generating else set()
    cache = PreEditCache.from_option(
        pre_cache, model, config, own_scorer=reference_scorer is not None
    )
    if gen_ids and reference_scorer is None and config.kind == "counterfact":
        from .tfidf import load_reference_scorer

        reference_scorer = load_reference_scorer()
    context = context or EditContext(progress=False, stats_corpus=config.stats_corpus)
    todo_cases = [c for b in todo for c in b]
    # Three steps per case (measure before, edit, measure after): the edits are most of a
    # sequential run's time, so the bar has to move while they happen.
    bar = tqdm(total=3 * len(todo_cases), disable=not progress, desc=f"eval {config.method} (batches of {batch_size})",
               unit="case", dynamic_ncols=True)  # fmt: skip

    def measure_all(group: list[EvalCase], pres: dict[Any, Any] | None = None) -> list[Any]:
        """Measure ``group`` on the model as it is (pre-edit when ``pres`` is None, read from
        the cache where it has them). The generations of the sampled cases that need them are
        made first, batched across cases (``gen_batch_rows``)."""

        def gen(c: EvalCase) -> bool:
            return json_id(c.case_id) in gen_ids and bool(c.generation_prompts)

        need = [
            c
            for c in group
            if gen(c) and (pres is not None or cache is None or cache.get(c.case_id, True) is None)
        ]
        made: dict[Any, Any] = {}
        if need:
            bar.set_postfix_str(f"generating for {len(need)} cases")
            gens = many_case_generations(model, tok, need, config, batch_rows=gen_batch_rows)
            made = {json_id(c.case_id): g for c, g in zip(need, gens, strict=True)}
            bar.set_postfix_str("")
        out = []
        for case in group:
            cid = json_id(case.case_id)
            pre = None if pres is None else pres[cid]

            def now(case: EvalCase = case, pre: Any = pre, cid: Any = cid) -> Any:
                return measure_case(model, tok, case, config, pre=pre, generation=cid in gen_ids,
                                    reference_scorer=reference_scorer, generations=made.get(cid))  # fmt: skip

            out.append(
                now()
                if pre is not None
                else measure_before(cache, case.case_id, cid in gen_ids, now)
            )
            bar.update(1)
        return out

    session = EditSession(model, tok, method=config.method, hparams=hparams, context=context)

    diagnostics: dict[Any, dict[str, Any]] = {}  # per case id, filled by apply()

    def apply(k: int, batch: list[EvalCase]) -> dict[Any, float]:
        """Edit ``batch`` in the session; the seconds per case (each case's diagnostics go
        to ``diagnostics``)."""
        bar.set_postfix_str(f"editing batch {k + 1}/{len(todo)}")
        t0 = time.perf_counter()
        result = session.apply([c.request for c in batch])
        per_case = (time.perf_counter() - t0) / len(batch)
        bar.set_postfix_str("")
        bar.update(len(batch))
        found = getattr(result, "diagnostics", None) or []
        for j, c in enumerate(batch):
            diagnostics[json_id(c.case_id)] = scalar_diagnostics(found[j]) if j < len(found) else {}
        return {json_id(c.case_id): per_case for c in batch}

    try:
        pres = {
            json_id(c.case_id): m for c, m in zip(todo_cases, measure_all(todo_cases), strict=True)
        }
        if config.sequential:
            edit_seconds = {}
            checkpoints = []
            sampled = [
                c for c in todo_cases if json_id(c.case_id) in gen_ids and c.generation_prompts
            ]
            for k, b in enumerate(todo):
                edit_seconds.update(apply(k, b))
                if k + 1 in gen_checkpoints:
                    bar.set_postfix_str(
                        f"fluency after batch {k + 1}: generating for {len(sampled)} cases"
                    )
                    gens = many_case_generations(
                        model, tok, sampled, config, batch_rows=gen_batch_rows
                    )
                    bar.set_postfix_str("")
                    edited = {json_id(c.case_id) for bb in todo[: k + 1] for c in bb}
                    checkpoints.append(
                        batch_checkpoint(k + 1, len(edited), sampled, gens, pres, edited)
                    )
            posts = measure_all(todo_cases, pres)
            records = checkpoints + [
                _record(c, pres, post, edit_seconds, diagnostics)
                for c, post in zip(todo_cases, posts, strict=True)
            ]
            for rec in records:
                append_line(out, rec)
        else:
            for k, b in enumerate(todo):
                secs = apply(k, b)
                try:
                    posts = measure_all(b, pres)
                finally:
                    session.revert_all()
                for c, post in zip(b, posts, strict=True):
                    append_line(out, _record(c, pres, post, secs, diagnostics))
    finally:
        bar.close()
        session.revert_all()
    return summarize(read_results(out), [c.case_id for c in cases])


def batch_checkpoint(
    after_batch: int,
    n_edits: int,
    sampled: Sequence[EvalCase],
    generations: Sequence[Any],
    pres: dict[Any, Any],
    edited: set[Any],
) -> dict[str, Any]:
    """The ``checkpoint`` line of a sequential mass-editing run after ``after_batch`` batches
    (``n_edits`` requests written): ``summary`` holds GE and GE-eos over the whole sample;
    ``groups`` the same for the sampled cases in ``edited`` and for the others, each with
    ``"<metric> change"``, the change paired case by case against the case's value in
    ``pres`` (before any edit); ``per_case`` each case's values and whether it was edited."""
    rows = []
    for case, gens in zip(sampled, generations, strict=True):
        cid = json_id(case.case_id)
        now = generation_metrics(gens)
        rows.append({"case_id": case.case_id, "edited": cid in edited, **now,
                     **{f"{m} pre": pres[cid].metrics.get(m) for m in GENERATION_METRICS}})  # fmt: skip

    def stats(group: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(group)}
        for m in GENERATION_METRICS:
            out[m] = mean_ci([r[m] for r in group]).to_dict()
            pairs = [r[m] - r[f"{m} pre"] for r in group if r[f"{m} pre"] is not None]
            out[f"{m} change"] = mean_ci(pairs).to_dict()
        return out

    return {
        "type": "checkpoint",
        "after_batch": after_batch,
        "n_cases": n_edits,
        "n_edits": n_edits,
        "summary": {m: mean_ci([r[m] for r in rows]).to_dict() for m in GENERATION_METRICS},
        "groups": {
            "edited": stats([r for r in rows if r["edited"]]),
            "unedited": stats([r for r in rows if not r["edited"]]),
        },
        "per_case": rows,
    }


def _record(
    case: EvalCase,
    pres: dict[Any, Any],
    post: Any,
    edit_seconds: dict[Any, float],
    diagnostics: dict[Any, dict[str, Any]],
) -> dict[str, Any]:
    cid = json_id(case.case_id)
    pre = pres[cid]
    seconds = {
        "edit": edit_seconds[cid],
        "pre_eval": sum(pre.seconds.values()),
        "post_eval": sum(post.seconds.values()),
    }
    rec: dict[str, Any] = {
        "type": "case",
        "case_id": case.case_id,
        "pre": pre.metrics,
        "post": post.metrics,
        "seconds": seconds,
        "pre_neighborhood_argmax": [list(a) for a in pre.neighborhood.true_argmax],
        # The method's diagnostics for this case's request (for MEMIT/AlphaEdit the first
        # request's also hold the batch's: retries, repaired earlier edits).
        "diagnostics": diagnostics.get(cid, {}),
    }
    if post.generations:
        rec["generations"] = {"pre": pre.generations, "post": post.generations}
    return rec


__all__ = ["batch_checkpoint", "generation_sample", "run_batch_evaluation"]
