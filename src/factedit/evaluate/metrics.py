"""Metrics of the ROME/MEMIT papers as pure functions of scores and texts.

Nothing here runs a model: the runner turns model outputs into :class:`PromptSetScores` and
generated texts, and these functions turn those into numbers, so every definition can be
checked by hand.

CounterFact (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"), per case:

* ``ES`` efficacy score: fraction of rewrite prompts where P(new) > P(true); ``EM`` efficacy
  magnitude: mean of P(new) - P(true). P(x) is ``exp`` of the *mean per-token* log-probability
  of the whole target ``x`` after the prompt (so multi-token targets compare fairly).
* ``PS``/``PM``: the same on the paraphrase prompts.
* ``NS``/``NM`` neighbourhood: fraction where P(true) > P(new), mean of P(true) - P(new), on
  prompts about other subjects that share the true answer.
* ``Score``: harmonic mean of ES, PS, NS (computed from the dataset means, see
  :func:`summarize_cases`).
* ``ES-acc``/``PS-acc``: EasyEdit's stricter top-1 accuracy: the fraction of the new target's
  tokens that are the model's argmax, teacher-forced, averaged over prompts. ``NS-acc``: the
  same for the true answer on the neighbourhood prompts. ``NS-agree`` (post-edit only): the
  fraction of neighbourhood answer tokens where the post-edit argmax equals the pre-edit
  argmax (EasyEdit's "locality").
* ``GE`` generation entropy (fluency): ROME's ``n_gram_entropy``, see :func:`ngram_entropy`.
* ``RS`` reference score (consistency): TF-IDF cosine of the generations and reference text
  about the new target, see :mod:`factedit.evaluate.tfidf`.

zsRE (Mitchell et al. 2022 layout, metrics as in ROME/MEMIT), per case:

* ``Efficacy``: token-level top-1 accuracy of the new answer after the question.
* ``Paraphrase``: the same after the rephrased question.
* ``Specificity``: fraction of the NQ locality answer's tokens (teacher-forced after the NQ
  question) where the post-edit model's argmax equals the pre-edit model's (MEMIT/EasyEdit).
* ``NQ-acc``: token-level top-1 accuracy of the NQ answer itself (ROME's neighbourhood
  accuracy), pre and post.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Order of CounterFact metrics in tables.
COUNTERFACT_METRICS = (
    "Score", "ES", "PS", "NS", "EM", "PM", "NM", "ES-acc", "PS-acc", "NS-acc", "NS-agree", "GE", "GE-eos", "RS",
)  # fmt: skip
#: Fluency metrics of a case's generations (see ``runner.generation_metrics``).
GENERATION_METRICS = ("GE", "GE-eos")
#: Metrics that are not rates: tables show them as they are, not in percent.
RAW_METRICS = (*GENERATION_METRICS, "RS")


def table_format(metric: str) -> tuple[float, int]:
    """``(scale, digits)`` for showing ``metric`` in a table: rates in percent with one digit,
    :data:`RAW_METRICS` as they are with two."""
    return (1.0, 2) if metric in RAW_METRICS else (100.0, 1)


#: Order of zsRE metrics in tables.
ZSRE_METRICS = ("Efficacy", "Paraphrase", "Specificity", "NQ-acc")
#: ROME's n-gram orders and weights for the generation entropy.
ENTROPY_NS = (2, 3)
ENTROPY_WEIGHTS = (2 / 3, 4 / 3)


@dataclass(frozen=True)
class PromptSetScores:
    """Scores of a set of prompts, each with a "new" and a "true" target.

    ``new_logprob[i]``/``true_logprob[i]``: mean per-token log-probability of each target
    after prompt ``i``; ``new_acc[i]``/``true_acc[i]``: fraction of that target's tokens that are
    the argmax (teacher-forced). ``true_argmax[i]``: the argmax token ids at the true target's
    positions (for pre/post agreement).
    """

    new_logprob: tuple[float, ...]
    true_logprob: tuple[float, ...]
    new_acc: tuple[float, ...] = ()
    true_acc: tuple[float, ...] = ()
    true_argmax: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        # ``new`` may be absent (zsRE's locality question has no "new" answer).
        if self.new_logprob and len(self.new_logprob) != len(self.true_logprob):
            raise ValueError("new and true scores differ in length")


# ---- elementary definitions --------------------------------------------------------------
def success_rate(winner_logprob: Sequence[float], loser_logprob: Sequence[float]) -> float:
    """Fraction of prompts where the winner's mean per-token log-prob is strictly higher."""
    _same_length(winner_logprob, loser_logprob)
    return float(np.mean([w > lo for w, lo in zip(winner_logprob, loser_logprob, strict=True)]))


def prob_margin(winner_logprob: Sequence[float], loser_logprob: Sequence[float]) -> float:
    """Mean over prompts of ``exp(winner) - exp(loser)`` (probability difference, in [-1, 1])."""
    _same_length(winner_logprob, loser_logprob)
    return float(
        np.mean(
            [
                math.exp(w) - math.exp(lo)
                for w, lo in zip(winner_logprob, loser_logprob, strict=True)
            ]
        )
    )


def token_accuracy(correct: Sequence[bool]) -> float:
    """Fraction of target tokens that are the argmax."""
    if len(correct) == 0:
        raise ValueError("no target tokens")
    return float(np.mean([bool(c) for c in correct]))


def argmax_agreement(pre: Sequence[Sequence[int]], post: Sequence[Sequence[int]]) -> float:
    """Mean over prompts of the fraction of positions where the argmax tokens agree."""
    if len(pre) != len(post) or not pre:
        raise ValueError("pre and post argmax lists must be non-empty and of equal length")
    per = []
    for a, b in zip(pre, post, strict=True):
        if len(a) != len(b) or not a:
            raise ValueError("pre and post argmax rows differ in length")
        per.append(np.mean([x == y for x, y in zip(a, b, strict=True)]))
    return float(np.mean(per))


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (its limit), NaN when any is NaN."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values")
    if any(math.isnan(v) for v in vals):
        return float("nan")
    if any(v < 0 for v in vals):
        raise ValueError(f"harmonic mean needs non-negative values, got {vals}")
    if any(v == 0 for v in vals):
        return 0.0
    return len(vals) / sum(1 / v for v in vals)


_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens for n-gram statistics: runs of word characters (with inner apostrophes) and
    single punctuation marks, case kept (close to NLTK's ``word_tokenize`` used by ROME)."""
    return _WORD.findall(text)


def ngram_entropy(
    text: str, ns: Sequence[int] = ENTROPY_NS, weights: Sequence[float] = ENTROPY_WEIGHTS
) -> float:
    """ROME's per-text n-gram entropy: ``mean_n(w_n * H_n)``, ``H_n = -sum f log2 f`` over the
    relative frequencies ``f`` of the text's word n-grams.

    With ROME's defaults this is ``((2/3) H_2 + (4/3) H_3) / 2``. A text with fewer than ``n``
    words contributes ``H_n = 0``.
    """
    if len(ns) != len(weights):
        raise ValueError("ns and weights differ in length")
    toks = words(text)
    terms = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        total = sum(grams.values())
        h = 0.0
        if total:
            f = np.array(list(grams.values()), dtype=np.float64) / total
            h = float(-(f * np.log2(f)).sum())
        terms.append(w * h)
    return float(np.mean(terms))


def generation_entropy(texts: Sequence[str]) -> float:
    """GE of one case: the mean of :func:`ngram_entropy` over its generations."""
    if not texts:
        raise ValueError("no generated texts")
    return float(np.mean([ngram_entropy(t) for t in texts]))


# ---- per-case metric sets ----------------------------------------------------------------
def counterfact_metrics(
    rewrite: PromptSetScores,
    paraphrase: PromptSetScores,
    neighborhood: PromptSetScores,
    *,
    pre_neighborhood: PromptSetScores | None = None,
) -> dict[str, float]:
    """The per-case CounterFact scores (ES, EM, PS, PM, NS, NM and the accuracies).

    ``pre_neighborhood``: the same case's neighbourhood scores before the edit; gives
    ``NS-agree``. Empty prompt sets (e.g. a flat record without paraphrases) are left out.
    """
    out: dict[str, float] = {}
    for key, s in (("ES", rewrite), ("PS", paraphrase)):
        if not s.new_logprob:
            continue
        out[key] = success_rate(s.new_logprob, s.true_logprob)
        out[key[0] + "M"] = prob_margin(s.new_logprob, s.true_logprob)
        if s.new_acc:
            out[f"{key}-acc"] = float(np.mean(s.new_acc))
    if neighborhood.new_logprob:
        out["NS"] = success_rate(neighborhood.true_logprob, neighborhood.new_logprob)
        out["NM"] = prob_margin(neighborhood.true_logprob, neighborhood.new_logprob)
        if neighborhood.true_acc:
            out["NS-acc"] = float(np.mean(neighborhood.true_acc))
        if (
            pre_neighborhood is not None
            and pre_neighborhood.true_argmax
            and neighborhood.true_argmax
        ):
            out["NS-agree"] = argmax_agreement(
                pre_neighborhood.true_argmax, neighborhood.true_argmax
            )
    return out


def zsre_metrics(
    question: PromptSetScores,
    rephrase: PromptSetScores,
    locality: PromptSetScores,
    *,
    pre_locality: PromptSetScores | None = None,
) -> dict[str, float]:
    """The per-case zsRE scores: token accuracies of the new answer (``Efficacy``,
    ``Paraphrase``), ``NQ-acc``, and, given the pre-edit locality scores, ``Specificity``."""
    out = {
        "Efficacy": float(np.mean(question.new_acc)),
        "Paraphrase": float(np.mean(rephrase.new_acc)),
        "NQ-acc": float(np.mean(locality.true_acc)),
    }
    if pre_locality is not None:
        out["Specificity"] = argmax_agreement(pre_locality.true_argmax, locality.true_argmax)
    return out


# ---- aggregation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A mean with a 95 % confidence interval half-width over ``n`` cases."""

    mean: float
    ci95: float
    n: int

    def format(
        self, scale: float = 1.0, digits: int = 1, *, signed: bool = False, unit: str = ""
    ) -> str:
        """``"mean ± ci"`` scaled (e.g. 100 for percent); ``"-"`` when there is no value.
        ``signed``: a "+" before a mean that shows above 0 (for changes); ``unit`` follows
        both numbers (``"-3.3 % ± 3.3 %"``)."""
        if self.n == 0 or math.isnan(self.mean):
            return "-"

        def num(x: float) -> str:
            text = f"{x * scale:.{digits}f}"
            # "-0.0" would suggest a sign the rounded value does not have.
            return (text[1:] if text.startswith("-") and float(text) == 0 else text) + unit

        mean = num(self.mean)
        if signed and float(mean.removesuffix(unit)) > 0:
            mean = "+" + mean
        if self.n < 2 or math.isnan(self.ci95):
            return mean
        return f"{mean} ± {num(self.ci95)}"

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready: NaN (no value, or no CI for a single case) becomes ``None``."""

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {"mean": clean(self.mean), "ci95": clean(self.ci95), "n": self.n}


def mean_ci(values: Sequence[float]) -> Estimate:
    """Mean and normal-approximation 95 % CI half-width ``1.96 * s / sqrt(n)`` (sample std,
    ``ddof=1``); NaN values are ignored; the half-width is NaN for fewer than 2 values."""
    vals = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if vals.size == 0:
        return Estimate(float("nan"), float("nan"), 0)
    if vals.size == 1:
        return Estimate(float(vals[0]), float("nan"), 1)
    return Estimate(
        float(vals.mean()), float(1.96 * vals.std(ddof=1) / math.sqrt(vals.size)), int(vals.size)
    )


def bootstrap_harmonic_ci(
    columns: Sequence[Sequence[float]], *, resamples: int = 1000, seed: int = 0
) -> Estimate:
    """Harmonic mean of the column means, with a percentile-bootstrap 95 % CI half-width
    (half the 2.5–97.5 percentile range of the statistic over resampled cases)."""
    data = np.array(columns, dtype=np.float64).T  # (cases, metrics)
    if data.size == 0:
        return Estimate(float("nan"), float("nan"), 0)
    point = harmonic_mean(data.mean(axis=0))
    n = data.shape[0]
    if n < 2:
        return Estimate(point, float("nan"), n)
    rng = np.random.default_rng(seed)
    stats = [harmonic_mean(data[rng.integers(0, n, n)].mean(axis=0)) for _ in range(resamples)]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return Estimate(point, float((hi - lo) / 2), n)


def summarize_cases(
    rows: Sequence[Mapping[str, float]], order: Sequence[str] = ()
) -> dict[str, Estimate]:
    """Per-metric :class:`Estimate` over the cases' metric dicts, in ``order`` then the rest.

    If the rows carry ES, PS and NS, ``Score`` is their harmonic mean computed from the means
    (as in ROME), over the cases that have all three, with a bootstrap CI.
    """
    names: list[str] = [m for m in order if any(m in r for r in rows)]
    names += sorted({k for r in rows for k in r} - set(names))
    out: dict[str, Estimate] = {}
    for name in names:
        if name == "Score":
            continue
        out[name] = mean_ci([r[name] for r in rows if name in r and r[name] is not None])
    full = [r for r in rows if all(r.get(k) is not None for k in ("ES", "PS", "NS"))]
    if full:
        score = bootstrap_harmonic_ci([[r[k] for r in full] for k in ("ES", "PS", "NS")])
        out = {"Score": score, **out}
    return out


def _pairs(
    before: Sequence[float | None], after: Sequence[float | None]
) -> list[tuple[float, float]]:
    """The ``(before[i], after[i])`` where both are numbers (not None, not NaN); a
    ``ValueError`` naming both lengths if the sequences differ in length."""
    if len(before) != len(after):
        raise ValueError(f"paired sequences differ in length ({len(before)} vs {len(after)})")
    return [
        (a, b)
        for a, b in zip(before, after, strict=True)
        if a is not None and b is not None and not (math.isnan(a) or math.isnan(b))
    ]


def paired_difference(before: Sequence[float | None], after: Sequence[float | None]) -> Estimate:
    """Mean of ``after[i] - before[i]`` over the pairs where both are numbers, with the 95 %
    half-width of those differences (:func:`mean_ci`).

    Pairing removes what the cases share before and after (a hard case stays hard), so this
    half-width is the one a change must beat, rather than the two unpaired ones side by side.
    Raises ``ValueError`` if the sequences differ in length.
    """
    return mean_ci([b - a for a, b in _pairs(before, after)])


def relative_change(before: Sequence[float | None], after: Sequence[float | None]) -> Estimate:
    """:func:`paired_difference` as a fraction of the mean of ``before`` over the same pairs
    (e.g. ``-0.02`` with half-width ``0.006``: a 2 % drop, ± 0.6 %). NaN when there is no pair
    or that mean is 0."""
    pairs = _pairs(before, after)
    diff = mean_ci([b - a for a, b in pairs])
    base = float(np.mean([a for a, _ in pairs])) if pairs else 0.0
    if base == 0:
        return Estimate(float("nan"), float("nan"), diff.n)
    return Estimate(diff.mean / base, diff.ci95 / abs(base), diff.n)


def paired_changes(
    pre_rows: Sequence[Mapping[str, float]], post_rows: Sequence[Mapping[str, float]]
) -> dict[str, Estimate]:
    """Per metric, :func:`paired_difference` of the cases' values after against before (row
    ``i`` of both is one case), over the cases that have the metric both times. ``Score``, a
    harmonic mean of means, has no per-case value and is left out."""
    names = [m for m in dict.fromkeys(k for r in pre_rows for k in r) if m != "Score"]
    out: dict[str, Estimate] = {}
    for m in names:
        est = paired_difference([r.get(m) for r in pre_rows], [r.get(m) for r in post_rows])
        if est.n:
            out[m] = est
    return out


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"score lists differ in length ({len(a)} vs {len(b)})")
    if not a:
        raise ValueError("no scores")
