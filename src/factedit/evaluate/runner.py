"""The evaluation runner: edit each case, measure before and after, record as it goes.

A run writes a JSONL file: a header line with the run's configuration, then one line per
finished case (``case_id``, ``pre`` and ``post`` metrics, seconds per phase), and in
sequential mode checkpoint lines. Lines are flushed and synced one by one, so an interrupted
run loses at most the case in progress; running again with the same configuration skips the
finished cases, and a different configuration is refused (:class:`ConfigMismatchError`).

Two modes:

* independent (default): each case is edited on the unedited model and restored
  bit-exactly afterwards, so every case sees the same starting weights;
* sequential: edits stay in place; "pre" is measured on the model holding all earlier edits;
  every ``checkpoint_every`` edits all edits so far are re-measured (scores only) to show how
  earlier edits hold up; with ``checkpoint_gen`` N, each checkpoint (and one before the first
  edit) also measures the fluency GE on the generation prompts of the run's first N cases,
  the same prompts every time, so the curve shows when the model starts to degenerate. The weights are restored when the run ends
  (also when it is interrupted); a resumed sequential run first re-applies the finished
  cases' edits (recomputing them) without measuring them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..requests import InvalidRequestError
from ..scoring import TargetScores, target_token_scores
from .datasets import EvalCase
from .metrics import (
    COUNTERFACT_METRICS,
    GENERATION_METRICS,
    ZSRE_METRICS,
    PromptSetScores,
    counterfact_metrics,
    generation_entropy,
    mean_ci,
    summarize_cases,
    zsre_metrics,
)
from .results import ResultsFile, Summary, append_line, json_id, read_results, summarize

if TYPE_CHECKING:
    from ..generation import FullLengthGenerations, GenerationGroup

log = logging.getLogger(__name__)

# 2: GE from full-length generations (ROME's protocol), GE-eos the earlier GE.
FORMAT_VERSION = 2
EditFn = Callable[..., Any]


class ConfigMismatchError(ValueError):
    """The results file belongs to a run with a different configuration.

    ``differences`` lists the differing fields (``"field: file has X, this run Y"``);
    :meth:`describe` phrases the message for a front end with its own way to overwrite.
    """

    def __init__(
        self, path: Path, differences: list[str], how_to_overwrite: str = "overwrite=True"
    ):
        self.path, self.differences = path, differences
        super().__init__(self.describe(how_to_overwrite))

    @property
    def fields(self) -> list[str]:
        """Names of the differing configuration fields."""
        return [d.split(":", 1)[0] for d in self.differences]

    def describe(self, how_to_overwrite: str) -> str:
        return (
            f"{self.path} holds results of a different configuration (differing field(s) "
            f"{', '.join(self.fields)}: {'; '.join(self.differences)}); choose another output "
            f"file, or pass {how_to_overwrite} to discard its results"
        )


@dataclass(frozen=True)
class EvalConfig:
    """Everything a run's numbers depend on; a results file holds exactly one configuration.

    ``limit`` is deliberately absent: a run may be resumed with a larger ``limit`` to add
    cases.
    """

    method: str
    hparams: dict[str, Any] | None
    model: str
    model_fingerprint: str
    dataset: str
    dataset_sha256: str
    kind: str
    sequential: bool = False
    checkpoint_every: int | None = None
    checkpoint_gen: int = 0
    generation: bool = True
    gen_length: int = 100
    gen_top_k: int = 5
    seed: int = 0
    # The text corpus of the second-moment statistics (a file path); None: the packaged Wikipedia.
    stats_corpus: str | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        # A JSON round trip so that comparing with a file's header compares like with like.
        return json.loads(json.dumps(asdict(self), default=str))


def environment(model: nn.Module) -> dict[str, Any]:
    """What a run's numbers depend on beyond its configuration: torch's thread count, torch's
    version, the weights' dtype and device (recorded in the results header).

    Scores are bit-for-bit reproducible on the same machine with the same threads, dtype,
    device and torch version; a different thread count changes floating-point reduction
    order, which can flip a close comparison (a PS of 1.0 vs 0.5 on one case was seen).
    """
    import torch

    from .. import __version__
    from ..models import model_device, model_dtype

    return {
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "dtype": str(model_dtype(model)).replace("torch.", ""),
        "device": str(model_device(model)),
        "factedit_version": __version__,
    }


def model_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter's exact bytes (names, dtypes, shapes included), so a results
    file is never resumed with an edited or different model."""
    from ..fingerprint import params_fingerprint
    from ..hooks import named_parameter_values

    return params_fingerprint(named_parameter_values(model))[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---- measuring one case ------------------------------------------------------------------
@dataclass
class Measurement:
    """Metrics of one case at one moment, plus what later comparisons need."""

    metrics: dict[str, float]
    neighborhood: PromptSetScores
    seconds: dict[str, float] = field(default_factory=dict)
    generations: list[str] = field(default_factory=list)


def _set_scores(
    scores: Sequence[TargetScores], n: int, with_new: bool
) -> tuple[PromptSetScores, int]:
    """Consume the scores of ``n`` prompts (``new`` then ``true`` per prompt when ``with_new``)."""
    news: list[TargetScores] = []
    trues: list[TargetScores] = []
    i = 0
    for _ in range(n):
        if with_new:
            news.append(scores[i])
            i += 1
        trues.append(scores[i])
        i += 1
    return (
        PromptSetScores(
            new_logprob=tuple(float(s.logprobs.mean()) for s in news),
            true_logprob=tuple(float(s.logprobs.mean()) for s in trues),
            new_acc=tuple(float(s.correct.float().mean()) for s in news),
            true_acc=tuple(float(s.correct.float().mean()) for s in trues),
            true_argmax=tuple(tuple(int(t) for t in s.argmax) for s in trues),
        ),
        i,
    )


def score_case(
    model: nn.Module, tok: Any, case: EvalCase, *, batch_size: int = 64
) -> list[PromptSetScores]:
    """Scores of the rewrite, paraphrase and neighbourhood prompts of ``case``, all in as few
    forward passes as ``batch_size`` allows (one for CounterFact's 13 prompts x 2 targets).

    Returns three :class:`PromptSetScores`: rewrite and paraphrase prompts with the new and
    true targets; neighbourhood prompts with the new target and the neighbourhood answer
    (zsRE's locality question: the answer only).
    """
    req = case.request
    new, true = req.target_text, req.true_text
    answer = " " + case.neighborhood_answer.lstrip() if case.neighborhood_answer else true
    if true is None or answer is None:
        raise InvalidRequestError(f"case {case.case_id!r} has no true target to compare with")
    neigh_with_new = case.kind != "zsre"
    sets = [
        ([case.rewrite_prompt], True, true),
        (list(case.paraphrase_prompts), True, true),
        (list(case.neighborhood_prompts), neigh_with_new, answer),
    ]
    prompts: list[str] = []
    targets: list[str] = []
    for ps, with_new, t in sets:
        for p in ps:
            if with_new:
                prompts.append(p)
                targets.append(new)
            prompts.append(p)
            targets.append(t)
    scores = target_token_scores(model, tok, prompts, targets, batch_size=batch_size)
    out = []
    pos = 0
    for ps, with_new, _ in sets:
        s, used = _set_scores(scores[pos:], len(ps), with_new)
        out.append(s)
        pos += used
    return out


def case_seed(seed: int, case_id: Any) -> int:
    """A per-case sampling seed, stable across processes (Python's ``hash`` is not)."""
    return (seed * 1_000_003 + zlib.crc32(str(case_id).encode())) % (2**31)


def measure_case(
    model: nn.Module,
    tok: Any,
    case: EvalCase,
    config: EvalConfig,
    *,
    pre: Measurement | None = None,
    generation: bool | None = None,
    reference_scorer: Any = None,
    generations: FullLengthGenerations | None = None,
) -> Measurement:
    """Metrics of ``case`` on the model as it is now.

    ``pre``: the measurement before the edit (gives the agreement metrics). ``generation``
    overrides ``config.generation``; generations are sampled top-k with a seed fixed per case,
    so pre and post differ only by the edit. ``generations``: the case's generations made
    already on this model (:func:`many_case_generations` batches many cases), used instead of
    generating them here when generation is on.
    """
    t0 = time.perf_counter()
    rewrite, para, neigh = score_case(model, tok, case)
    pre_neigh = pre.neighborhood if pre is not None else None
    if case.kind == "zsre":
        metrics = zsre_metrics(rewrite, para, neigh, pre_locality=pre_neigh)
    else:
        metrics = counterfact_metrics(rewrite, para, neigh, pre_neighborhood=pre_neigh)
    seconds = {"scoring": time.perf_counter() - t0}
    texts: list[str] = []
    do_gen = config.generation if generation is None else generation
    if do_gen and case.generation_prompts:
        t1 = time.perf_counter()
        gens = (
            generations if generations is not None else case_generations(model, tok, case, config)
        )
        metrics.update(generation_metrics(gens))
        texts = gens.texts
        if reference_scorer is not None:
            rs = reference_scorer.reference_score(texts, case.request.target_new)
            if rs is not None:
                metrics["RS"] = rs
        seconds["generation"] = time.perf_counter() - t1
    return Measurement(metrics, neigh, seconds, texts)


def _generation_group(tok: Any, case: EvalCase, config: EvalConfig) -> GenerationGroup:
    """A case's generation prompts with their length and per-case seed (ROME generates until
    the padded batch reaches ``gen_length`` tokens in total)."""
    from ..generation import GenerationGroup

    prompts = list(case.generation_prompts)
    longest = max((len(tok(p)["input_ids"]) for p in prompts), default=0)
    return GenerationGroup(
        prompts, max(1, config.gen_length - longest), case_seed(config.seed, case.case_id)
    )


def case_generations(
    model: nn.Module, tok: Any, case: EvalCase, config: EvalConfig
) -> FullLengthGenerations:
    """The sampled continuations of ``case.generation_prompts`` (top-k, seeded per case, so
    the same case gives the same samples on the same weights), generated to full length as
    ROME's evaluation does, and the same cut at their first end-of-sequence token."""
    from ..generation import generate_full_length

    g = _generation_group(tok, case, config)
    return generate_full_length(
        model, tok, g.prompts, max_new_tokens=g.max_new_tokens, top_k=config.gen_top_k, seed=g.seed
    )


def many_case_generations(
    model: nn.Module,
    tok: Any,
    cases: Sequence[EvalCase],
    config: EvalConfig,
    *,
    batch_rows: int = 128,
) -> list[FullLengthGenerations]:
    """:func:`case_generations` of every case in ``cases`` (in order), with the cases' prompts
    batched together up to ``batch_rows`` rows a call, each case still sampled from its own
    seed (so each case's texts are those :func:`case_generations` gives, up to the
    floating-point effect of the larger batch: see ``generate_full_length_groups``)."""
    from ..generation import generate_full_length_groups

    groups = [_generation_group(tok, c, config) for c in cases]
    return generate_full_length_groups(
        model, tok, groups, top_k=config.gen_top_k, batch_rows=batch_rows
    )


def generation_metrics(gens: FullLengthGenerations) -> dict[str, float]:
    """Fluency of one case's generations: ``GE``, the n-gram entropy of the full-length texts
    (ROME's protocol: its sampler has no stop token), and ``GE-eos``, that of the same texts
    cut at the first end-of-sequence token (factedit's GE before results format 2, which
    counts a text the model ends early as less fluent)."""
    return {"GE": generation_entropy(gens.texts), "GE-eos": generation_entropy(gens.ended)}


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two configuration dicts. A field one of them lacks
    (a file written before the field existed) counts as its default."""
    defaults = {f.name: f.default for f in fields(EvalConfig) if f.default is not MISSING}
    return [
        f"{k}: file has {a.get(k, defaults.get(k))!r}, this run {b.get(k, defaults.get(k))!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, defaults.get(k)) != b.get(k, defaults.get(k))
    ]


# ---- the run ---------------------------------------------------------------------------------
def _default_edit_fn() -> EditFn:
    from ..methods import edit

    return edit


def resolved_hparams(
    model: nn.Module, method: str, hparams: Any, *, strict: bool = False
) -> dict[str, Any] | None:
    """The full hyperparameters a run will use, as a dict, checked against the model (a bad
    field or value raises ``ValueError``). An unknown method gives ``None`` (e.g. for a custom
    ``edit_fn``), or raises with ``strict``."""
    from ..arch import describe
    from ..methods import MethodNotAvailableError, get_method, resolve_hparams

    try:
        impl = get_method(method)
    except MethodNotAvailableError:
        if strict:
            raise
        return dict(hparams) if isinstance(hparams, Mapping) else None
    arch = describe(model)
    hp = resolve_hparams(impl, model, hparams, arch)
    impl.check(hp, arch)
    return hp.to_dict()


def _check_environment(out: Path, existing: ResultsFile, env: Mapping[str, Any]) -> None:
    """Warn when a run resumes in another environment than the one that began it."""
    before = (existing.header or {}).get("environment") or {}
    keys = ("threads", "torch_version", "dtype", "device")
    diffs = [f"{k} {before[k]} -> {env[k]}" for k in keys if k in before and before[k] != env[k]]
    if diffs:
        log.warning(
            "resuming %s in another environment (%s): the cases run now may differ slightly from "
            "what the first environment would have given (results repeat exactly only with the "
            "same threads, dtype, device and torch version)", out, ", ".join(diffs),
        )  # fmt: skip


def make_config(
    model: nn.Module,
    *,
    method: str,
    hparams: Any,
    model_name: str,
    dataset: str | Path,
    kind: str,
    sequential: bool = False,
    checkpoint_every: int | None = None,
    checkpoint_gen: int = 0,
    generation: bool = True,
    gen_length: int = 100,
    gen_top_k: int = 5,
    seed: int = 0,
    stats_corpus: str | Path | None = None,
) -> EvalConfig:
    """An :class:`EvalConfig` for this model (fingerprinted now: call it on unedited weights)."""
    path = Path(dataset).resolve()
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every}")
    if checkpoint_gen < 0:
        raise ValueError(f"checkpoint_gen must be >= 0, got {checkpoint_gen}")
    return EvalConfig(
        method=method,
        hparams=resolved_hparams(model, method, hparams),
        model=model_name,
        model_fingerprint=model_fingerprint(model),
        dataset=str(path),
        dataset_sha256=file_sha256(path),
        kind="zsre" if kind == "zsre" else "counterfact",
        sequential=sequential,
        checkpoint_every=checkpoint_every if sequential else None,
        checkpoint_gen=checkpoint_gen if sequential and checkpoint_every else 0,
        generation=generation,
        gen_length=gen_length,
        gen_top_k=gen_top_k,
        seed=seed,
        stats_corpus=None if stats_corpus is None else str(Path(stats_corpus).resolve()),
    )


def run_evaluation(
    model: nn.Module,
    tok: Any,
    cases: Sequence[EvalCase],
    config: EvalConfig,
    out: str | Path,
    *,
    hparams: Any = None,
    edit_fn: EditFn | None = None,
    reference_scorer: Any = None,
    progress: bool = True,
    overwrite: bool = False,
    edit_kwargs: Mapping[str, Any] | None = None,
    pre_cache: bool | str | Path = False,
) -> Summary:
    """Evaluate ``config.method`` on ``cases``, appending to the results file ``out``.

    ``hparams`` is what the edit function receives (``None``: the method's defaults; a dict:
    overrides); ``config.hparams`` records the resolved values. ``edit_fn(model, tok, request,
    method=..., hparams=...)`` defaults to :func:`factedit.methods.edit` and must return an
    object with ``restore()`` and ``timings["total"]``. ``pre_cache`` (True or a folder): read
    pre-edit measurements from the disk cache of :mod:`~factedit.evaluate.precache` and store
    the missing ones; one-at-a-time runs only (a sequential run measures each case after the
    edits before it) and not with a caller's own ``reference_scorer``.

    Guarantees: finished cases already in ``out`` are not redone (a file with a different
    configuration raises :class:`ConfigMismatchError`, unless ``overwrite``); the model's
    weights are the same on return (or exception) as on entry.
    """
    out = Path(out)
    default_edit = edit_fn is None
    if edit_fn is None:
        # Validate the method and its hyperparameters before anything is written, so a typo
        # does not leave a results file behind.
        resolved_hparams(model, config.method, hparams, strict=True)
        edit_fn = _default_edit_fn()
    cfg = config.to_dict()
    env = environment(model)
    if out.exists() and out.is_dir():
        raise IsADirectoryError(f"results file {out} is a folder")
    if out.exists() and overwrite:
        out.unlink()
    if out.exists() and out.stat().st_size > 0:
        existing = read_results(out, repair=True)
        if not existing.cases and not existing.checkpoints:
            # A header without results (a run stopped before its first case): nothing to keep.
            log.info("%s holds no results yet; starting it afresh", out)
            out.unlink()
            existing = ResultsFile(None, [], [])
        elif existing.config is not None and existing.config != cfg:
            raise ConfigMismatchError(out, config_differences(existing.config, cfg))
        else:
            _check_environment(out, existing, env)
    else:
        existing = ResultsFile(None, [], [])
    if existing.header is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        notes = []
        if config.generation and config.kind == "counterfact":
            from .tfidf import RS_NOTE

            notes.append(RS_NOTE)
        append_line(
            out,
            {
                "type": "header",
                "config": cfg,
                "environment": env,
                "notes": notes,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
        existing = read_results(out)

    done = {c["case_id"] for c in existing.cases}
    todo = [c for c in cases if json_id(c.case_id) not in done]
    ekw = dict(edit_kwargs or {})
    if default_edit:
        from ..methods import EditContext

        # One context for the whole run: statistics and templates are read once, not per case.
        ekw.setdefault("context", EditContext(progress=False, stats_corpus=config.stats_corpus))
    from .precache import PreEditCache

    # A sequential run measures case i after edits 1..i-1, not on the model the cache keys.
    option = False if config.sequential else pre_cache
    cache = PreEditCache.from_option(option, model, config, own_scorer=reference_scorer is not None)
    if config.generation and reference_scorer is None and config.kind == "counterfact":
        from .tfidf import load_reference_scorer

        reference_scorer = load_reference_scorer()

    from tqdm.auto import tqdm

    bar = tqdm(total=len(cases), initial=len(cases) - len(todo), disable=not progress,
               desc=f"eval {config.method}", unit="case", dynamic_ncols=True)  # fmt: skip
    applied: list[Any] = []  # sequential mode: results of the edits in place
    checkpointed = {cp["n_cases"] for cp in existing.checkpoints}
    try:
        if (
            config.sequential
            and config.checkpoint_gen
            and not existing.cases
            and 0 not in checkpointed
        ):
            # The baseline of the fluency curve, on the unedited model.
            cp = _checkpoint(model, tok, cases, [], config)
            append_line(out, cp)
            existing.checkpoints.append(cp)
            checkpointed.add(0)
        if config.sequential:
            ids = [json_id(c.case_id) for c in cases]
            finished = [c for c in cases if json_id(c.case_id) in done]
            if ids[: len(finished)] != [json_id(c.case_id) for c in finished]:
                raise ValueError(
                    "sequential results must cover a prefix of the cases; the case order changed"
                )
            if finished:
                log.info("re-applying %d finished edits of the sequential run", len(finished))
                ok = {c["case_id"] for c in existing.cases if "error" not in c}
                for c in finished:
                    if json_id(c.case_id) in ok:
                        applied.append(
                            edit_fn(
                                model, tok, c.request, method=config.method, hparams=hparams, **ekw
                            )
                        )
        for case in todo:
            record = _run_case(
                model, tok, case, config, edit_fn, hparams, ekw, reference_scorer, applied, cache
            )
            append_line(out, record)
            existing.cases.append(record)
            bar.update(1)
            n = len(existing.cases)
            last = case is todo[-1] and n == len(cases)
            due = config.checkpoint_every and (n % config.checkpoint_every == 0 or last)
            if config.sequential and due and n not in checkpointed:
                cp = _checkpoint(model, tok, cases, existing.cases, config)
                append_line(out, cp)
                existing.checkpoints.append(cp)
                checkpointed.add(n)
    finally:
        bar.close()
        for result in reversed(applied):
            result.restore()
    return summarize(read_results(out), [c.case_id for c in cases])


def _run_case(
    model: nn.Module,
    tok: Any,
    case: EvalCase,
    config: EvalConfig,
    edit_fn: EditFn,
    hparams: Any,
    ekw: dict[str, Any],
    reference_scorer: Any,
    applied: list[Any],
    cache: Any = None,
) -> dict[str, Any]:
    from ..methods import EditError

    t0 = time.perf_counter()
    from .precache import measure_before

    pre = measure_before(cache, case.case_id, config.generation,
                         lambda: measure_case(model, tok, case, config, reference_scorer=reference_scorer))  # fmt: skip
    try:
        result = edit_fn(model, tok, case.request, method=config.method, hparams=hparams, **ekw)
    except (EditError, InvalidRequestError) as exc:
        # The edit interface guarantees the model is unchanged after a failed edit.
        log.warning("case %r: edit failed: %s", case.case_id, exc)
        return {"type": "case", "case_id": case.case_id, "error": f"{type(exc).__name__}: {exc}"}
    try:
        post = measure_case(model, tok, case, config, pre=pre, reference_scorer=reference_scorer)
    finally:
        if config.sequential:
            applied.append(result)
        else:
            result.restore()
    seconds = {
        "edit": float(result.timings.get("total", float("nan"))),
        "pre_eval": sum(pre.seconds.values()),
        "post_eval": sum(post.seconds.values()),
        "case": time.perf_counter() - t0,
    }
    if "generation" in post.seconds:
        # A pre-edit measurement read from the cache cost this run nothing.
        seconds["generation"] = pre.seconds.get("generation", 0.0) + post.seconds["generation"]
    record: dict[str, Any] = {
        "type": "case",
        "case_id": case.case_id,
        "pre": pre.metrics,
        "post": post.metrics,
        "seconds": seconds,
        # Pre-edit argmax on the neighbourhood answers: sequential checkpoints need it for the
        # agreement metrics after the model has changed.
        "pre_neighborhood_argmax": [list(a) for a in pre.neighborhood.true_argmax],
    }
    diagnostics = getattr(result, "diagnostics", None) or [{}]
    record["diagnostics"] = scalar_diagnostics(diagnostics[0])
    if post.generations:
        record["generations"] = {"pre": pre.generations, "post": post.generations}
    return record


def scalar_diagnostics(diagnostics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar entries of a method's diagnostics for one request (steps, losses, efficacy
    check, retries), as results records keep them for looking into individual cases; the
    metrics never depend on them."""
    return {
        k: v for k, v in diagnostics.items() if isinstance(v, (bool, int, float, str)) or v is None
    }


def _checkpoint(
    model: nn.Module,
    tok: Any,
    cases: Sequence[EvalCase],
    records: Sequence[dict[str, Any]],
    config: EvalConfig,
) -> dict[str, Any]:
    """Re-measure every case edited so far (scores only) on the current model, and with
    ``config.checkpoint_gen`` the fluency of the run's first cases' generation prompts."""
    by_id = {json_id(c.case_id): c for c in cases}
    rows = []
    for rec in records:
        if "error" in rec:
            continue
        case = by_id[rec["case_id"]]
        argmax = tuple(tuple(a) for a in rec["pre_neighborhood_argmax"])
        pre = Measurement({}, PromptSetScores((), tuple(0.0 for _ in argmax), true_argmax=argmax))
        rows.append(measure_case(model, tok, case, config, pre=pre, generation=False).metrics)
    order = ZSRE_METRICS if config.kind == "zsre" else COUNTERFACT_METRICS
    summary = {k: v.to_dict() for k, v in summarize_cases(rows, order).items()} if rows else {}
    if config.checkpoint_gen:
        sample = [c for c in cases if c.generation_prompts][: config.checkpoint_gen]
        # Generations only: the cases' scores are not part of the fluency curve.
        ge = [generation_metrics(g) for g in many_case_generations(model, tok, sample, config)]
        if ge:
            summary.update({m: mean_ci([g[m] for g in ge]).to_dict() for m in GENERATION_METRICS})
    return {
        "type": "checkpoint",
        "n_cases": len(records),
        "n_edits": len(rows),
        "summary": summary,
    }


__all__ = [
    "ConfigMismatchError",
    "EvalConfig",
    "Measurement",
    "environment",
    "make_config",
    "measure_case",
    "model_fingerprint",
    "run_evaluation",
    "score_case",
]
